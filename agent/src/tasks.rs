//! The agent's tasks under one tracker: each is spawned with a name, and a panic (or an
//! unexpected end) is logged at error with that name, signalled at once so `Agent::run` can stop
//! the others, and returned as [`AgentError::TaskFailed`] when the task is joined.

use crate::error::AgentError;
use std::future::Future;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Spawns and supervises the agent's tasks.
pub(crate) struct Tasks {
    tracker: TaskTracker,
    failed: CancellationToken,
    /// Test hook: the task of this name panics as it starts.
    #[cfg(test)]
    panic_in: Option<&'static str>,
}

/// One supervised task: join it to learn how it ended.
pub(crate) struct Task {
    name: &'static str,
    handle: JoinHandle<Result<(), AgentError>>,
}

impl Tasks {
    pub(crate) fn new() -> Self {
        Self {
            tracker: TaskTracker::new(),
            failed: CancellationToken::new(),
            #[cfg(test)]
            panic_in: None,
        }
    }

    /// Test hook: the task spawned as `name` panics as it starts.
    #[cfg(test)]
    pub(crate) fn inject_panic(&mut self, name: &'static str) {
        self.panic_in = Some(name);
    }

    /// Cancelled as soon as any task fails.
    pub(crate) fn failed(&self) -> CancellationToken {
        self.failed.clone()
    }

    /// Spawns `fut` as the task `name`.
    pub(crate) fn spawn<F>(&self, name: &'static str, fut: F) -> Task
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.supervise(name, async move {
            fut.await;
            Ok(())
        })
    }

    /// Spawns `fut` as the task `name`; its `Err` counts as a failure like a panic does.
    pub(crate) fn supervise<F>(&self, name: &'static str, fut: F) -> Task
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        #[cfg(test)]
        let fut = {
            let inject = self.panic_in == Some(name);
            async move {
                if inject {
                    panic!("injected panic in {name}");
                }
                fut.await
            }
        };
        let inner = self.tracker.spawn(fut);
        let failed = self.failed.clone();
        let handle = self.tracker.spawn(async move {
            let detail = match inner.await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(detail)) => detail,
                Err(e) if e.is_panic() => panic_message(e.into_panic()),
                Err(e) => e.to_string(),
            };
            tracing::error!(task = name, error = %detail, "agent task failed; stopping the agent");
            failed.cancel();
            Err(AgentError::TaskFailed { task: name, detail })
        });
        Task { name, handle }
    }

    /// Waits for every task spawned here (after each was joined or stopped).
    pub(crate) async fn close(self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Task {
    /// Waits for the task; `Err` if it panicked or failed.
    pub(crate) async fn join(self) -> Result<(), AgentError> {
        match self.handle.await {
            Ok(r) => r,
            // The supervising wrapper itself does not panic; be exact anyway.
            Err(e) => Err(AgentError::TaskFailed {
                task: self.name,
                detail: e.to_string(),
            }),
        }
    }

    /// Like [`Task::join`], giving up after `limit` (`None`: still running).
    pub(crate) async fn join_within(
        &mut self,
        limit: std::time::Duration,
    ) -> Option<Result<(), AgentError>> {
        let name = self.name;
        match tokio::time::timeout(limit, &mut self.handle).await {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => Some(Err(AgentError::TaskFailed {
                task: name,
                detail: e.to_string(),
            })),
            Err(_) => None,
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".into()
    }
}

/// Keeps the first failure of several joins.
pub(crate) fn first_failure(acc: &mut Result<(), AgentError>, next: Result<(), AgentError>) {
    if acc.is_ok() {
        *acc = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_reported_by_name_and_signalled() {
        let tasks = Tasks::new();
        let failed = tasks.failed();
        let ok = tasks.spawn("quiet", async {});
        let bad = tasks.spawn("worker", async { panic!("boom") });
        // Signalled without anyone joining it: no sleeping, the token is the condition.
        tokio::time::timeout(std::time::Duration::from_secs(10), failed.cancelled())
            .await
            .expect("failure signalled");
        assert!(ok.join().await.is_ok());
        match bad.join().await {
            Err(AgentError::TaskFailed { task, detail }) => {
                assert_eq!(task, "worker");
                assert!(detail.contains("boom"), "{detail}");
            }
            other => panic!("expected TaskFailed, got {other:?}"),
        }
        tasks.close().await;
    }

    #[tokio::test]
    async fn a_failed_task_is_reported_and_a_clean_one_is_not() {
        let tasks = Tasks::new();
        let failed = tasks.failed();
        let t = tasks.supervise("uplink", async { Err("thread gone".to_string()) });
        let err = t.join().await.unwrap_err();
        assert!(err.to_string().contains("uplink"), "{err}");
        assert!(failed.is_cancelled());
        let tasks = Tasks::new();
        tasks.spawn("source", async {}).join().await.unwrap();
        assert!(!tasks.failed().is_cancelled());
    }
}

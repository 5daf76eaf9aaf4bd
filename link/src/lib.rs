//! The MQTT link of every edgewatch component (agent source and uplink, aggregator, simulator):
//! the `mqtt:` settings, TLS, the mapping onto rumqttc and the one reconnecting poll loop.
//!
//! Settings, backoff and reconnect decisions are plain data and state machines, tested without a
//! broker; [`poll::poll_loop`] is the thin async shell that applies them to a rumqttc event loop.
//! [`bearer`] is the one bearer-token check of the agent's and the aggregator's HTTP endpoints.

pub mod backoff;
pub mod bearer;
pub mod error;
pub mod options;
pub mod poll;
pub mod reconnect;
pub mod settings;
pub mod tls;

pub use error::{LinkError, TlsError};
pub use options::{client, options};
pub use poll::{poll_loop, Flow, LinkCounters, LinkEvent, LinkHandler};
pub use reconnect::{describe, failure_message, refusal_message};
pub use settings::MqttLink;
pub use tls::TlsSettings;

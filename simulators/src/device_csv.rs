//! A simulated fleet as labelled multi-sensor CSV, one text per device, for `edgewatch eval csv`
//! and for anyone who wants the simulator's data in a spreadsheet.
//!
//! **Format:** a header `timestamp,<metric1>,...,<metricN>,label`, then one row per step:
//! the timestamp in Unix milliseconds (an integer), each metric's value (Rust's shortest round-trip
//! form; an empty cell where the metric had no reading, i.e. during a dropout), and `label` 1 while
//! any labelled anomaly of that device covers the step, else 0. Separator `,`, lines end with `\n`.
//! Writes into `impl io::Write` and opens no file.

use crate::anomaly::GroundTruth;
use crate::config::SimulatorConfig;
use crate::fleet::Fleet;
use std::fmt::Write as _;
use std::io;

/// A problem writing a fleet as CSV.
#[derive(Debug, thiserror::Error)]
pub enum FleetCsvError {
    /// One writer per device is needed.
    #[error("fleet csv: need one writer per device ({expected}), got {got}")]
    Writers {
        /// Devices in the fleet.
        expected: usize,
        /// Writers given.
        got: usize,
    },
    /// A writer failed.
    #[error("fleet csv: writing device {device}")]
    Io {
        /// The device whose writer failed.
        device: String,
        /// What the writer said.
        #[source]
        source: io::Error,
    },
}

/// Steps `fleet` until its next step would be at or after `end_ms`, writing device `d`'s rows into
/// `writers[d]` (header first; see the module docs for the format). The labels stay in the fleet
/// ([`Fleet::ground_truth`] and [`Fleet::in_progress`]).
pub fn write_fleet_csv<W: io::Write>(
    fleet: &mut Fleet,
    end_ms: i64,
    writers: &mut [W],
) -> Result<(), FleetCsvError> {
    let devices = fleet.devices();
    if writers.len() != devices.len() {
        return Err(FleetCsvError::Writers {
            expected: devices.len(),
            got: writers.len(),
        });
    }
    let metrics = fleet.metrics();
    let io_err = |d: usize, source| FleetCsvError::Io {
        device: devices[d].to_string(),
        source,
    };
    let mut header = String::from("timestamp");
    for m in &metrics {
        header.push(',');
        header.push_str(m);
    }
    header.push_str(",label\n");
    for (d, w) in writers.iter_mut().enumerate() {
        w.write_all(header.as_bytes()).map_err(|e| io_err(d, e))?;
    }
    let per_device = metrics.len().max(1);
    let mut values: Vec<Option<f64>> = vec![None; devices.len() * per_device];
    let mut labelled = vec![false; devices.len()];
    let mut scratch = Vec::new();
    let mut row = String::new();
    while fleet.now_ms() < end_ms {
        let ts = fleet.now_ms();
        scratch.clear();
        labelled.iter_mut().for_each(|l| *l = false);
        fleet.step_with(&mut scratch, |s| {
            values[s.index] = s.value;
            labelled[s.index / per_device] |= s.labelled;
        });
        for (d, w) in writers.iter_mut().enumerate() {
            row.clear();
            // Writing to a String cannot fail.
            let _ = write!(row, "{ts}");
            for v in &values[d * per_device..(d + 1) * per_device] {
                row.push(',');
                if let Some(v) = v {
                    let _ = write!(row, "{v}");
                }
            }
            row.push_str(if labelled[d] { ",1\n" } else { ",0\n" });
            w.write_all(row.as_bytes()).map_err(|e| io_err(d, e))?;
        }
    }
    Ok(())
}

/// One simulated run as CSV texts, with its labels.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetCsv {
    /// `(device id, CSV text)` per device, in device order.
    pub devices: Vec<(String, String)>,
    /// Every label of the run, those still open at the end included (cut at the last step).
    pub labels: Vec<GroundTruth>,
}

/// Simulates `cfg` from `start_ms` for `duration_ms` and returns each device's run as CSV text (see
/// the module docs). Holds every text in memory: about 10 bytes per reading.
pub fn fleet_csv(
    cfg: &SimulatorConfig,
    start_ms: i64,
    duration_ms: u64,
) -> anyhow::Result<FleetCsv> {
    let mut fleet = Fleet::new(cfg, start_ms)?;
    let end_ms = start_ms.saturating_add(i64::try_from(duration_ms).unwrap_or(i64::MAX));
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); fleet.devices().len()];
    write_fleet_csv(&mut fleet, end_ms, &mut bufs)?;
    let devices = fleet
        .devices()
        .iter()
        .zip(bufs)
        .map(|(d, b)| {
            // Only ASCII digits, signs, dots, commas and validated names were written.
            let text = String::from_utf8(b)
                .map_err(|e| anyhow::anyhow!("fleet csv: device {d}: not UTF-8: {e}"))?;
            Ok((d.to_string(), text))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut labels = fleet.ground_truth().to_vec();
    labels.extend(fleet.in_progress());
    Ok(FleetCsv { devices, labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anomaly::AnomalyKind;

    const START: i64 = 1_767_225_600_000;

    fn small() -> SimulatorConfig {
        let mut cfg = SimulatorConfig {
            devices: 3,
            seed: 11,
            ..Default::default()
        };
        let a = &mut cfg.anomalies;
        a.rate_per_series_hour = 20.0;
        a.warmup_ms = 60_000;
        a.min_gap_ms = 30_000;
        a.dropout_duration_ms = 20_000;
        a.peer_drift_duration_ms = 60_000;
        a.peer_drift_return_ms = 10_000;
        cfg
    }

    #[test]
    fn rows_match_the_readings_and_labels_cover_exactly_the_labelled_steps() {
        let cfg = small();
        let duration = 1_800_000;
        let csv = fleet_csv(&cfg, START, duration).unwrap();
        assert_eq!(csv.devices.len(), 3);
        // The same run through the plain API.
        let mut fleet = Fleet::new(&cfg, START).unwrap();
        let mut readings = Vec::new();
        while fleet.now_ms() < START + duration as i64 {
            fleet.step(&mut readings);
        }
        let metrics = fleet.metrics();
        let mut saw_label = false;
        let mut saw_gap = false;
        for (device, text) in &csv.devices {
            let mut lines = text.lines();
            assert_eq!(
                lines.next(),
                Some("timestamp,temperature,flow,current,pressure,label")
            );
            let rows: Vec<&str> = lines.collect();
            assert_eq!(rows.len(), 1800);
            for (k, row) in rows.iter().enumerate() {
                let cells: Vec<&str> = row.split(',').collect();
                assert_eq!(cells.len(), 2 + metrics.len(), "{row}");
                let ts: i64 = cells[0].parse().unwrap();
                assert_eq!(ts, START + k as i64 * 1000);
                for (j, m) in metrics.iter().enumerate() {
                    let r = readings
                        .iter()
                        .find(|r| *r.device == **device && r.metric == *m && r.ts_ms == ts);
                    match r {
                        Some(r) => assert_eq!(cells[1 + j].parse::<f64>().unwrap(), r.value),
                        None => {
                            assert_eq!(cells[1 + j], "", "{row}");
                            saw_gap = true;
                        }
                    }
                }
                let expected = csv
                    .labels
                    .iter()
                    .any(|g| g.device == *device && g.start_ms <= ts && ts <= g.end_ms);
                assert_eq!(cells[1 + metrics.len()], if expected { "1" } else { "0" });
                saw_label |= expected;
            }
        }
        assert!(saw_label && saw_gap);
        assert!(csv.labels.iter().any(|g| g.kind == AnomalyKind::Dropout));
    }

    #[test]
    fn the_wrong_number_of_writers_is_an_error_and_nothing_runs() {
        let mut fleet = Fleet::new(&small(), START).unwrap();
        let mut two: Vec<Vec<u8>> = vec![Vec::new(); 2];
        let e = write_fleet_csv(&mut fleet, START + 10_000, &mut two).unwrap_err();
        assert!(e.to_string().contains("(3), got 2"), "{e}");
        assert_eq!(fleet.now_ms(), START);
        assert!(two.iter().all(Vec::is_empty));
    }

    #[test]
    fn a_failing_writer_names_its_device() {
        struct Broken;
        impl io::Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let cfg = SimulatorConfig {
            devices: 1,
            ..Default::default()
        };
        let mut fleet = Fleet::new(&cfg, START).unwrap();
        let e = write_fleet_csv(&mut fleet, START + 10_000, &mut [Broken]).unwrap_err();
        assert!(e.to_string().contains("dev-0000"), "{e}");
    }

    #[test]
    fn an_empty_run_is_just_the_headers() {
        let csv = fleet_csv(&small(), START, 0).unwrap();
        assert!(csv
            .devices
            .iter()
            .all(|(_, t)| t == "timestamp,temperature,flow,current,pressure,label\n"));
        assert!(csv.labels.is_empty());
        assert!(fleet_csv(
            &SimulatorConfig {
                devices: 0,
                ..Default::default()
            },
            START,
            1000
        )
        .is_err());
    }
}

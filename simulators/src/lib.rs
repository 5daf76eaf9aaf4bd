//! edgewatch fleet simulator: devices × metrics with realistic signals (optionally driven by a
//! hidden load per device, so a device's metrics move together) and injected, labelled anomalies,
//! published as JSON over MQTT or written as CSV per device.
//!
//! [`Fleet`] is the pure generator (no I/O, no clock), so tests and the evaluator can drive it
//! directly; [`run`] is the thin async shell that paces it, publishes it with rumqttc and writes
//! the ground truth and the readings log. Loading YAML and printing errors belong to the `edgewatch` binary.

mod anomaly;
mod anomaly_config;
mod config;
mod device_csv;
mod fleet;
mod load;
mod pace;
mod publish;
mod readings_log;
mod topic;

pub use anomaly::{AnomalyKind, GroundTruth};
pub use config::{AnomalyConfig, MetricSpec, SimulatorConfig};
pub use device_csv::{fleet_csv, write_fleet_csv, FleetCsv, FleetCsvError};
pub use fleet::{Fleet, SimReading};
pub use load::LoadConfig;
pub use publish::{payload, run, SimReport};
pub use readings_log::{format_line, parse_line, LoggedReading, ReadingsLogError};

//! edgewatch's integration tests: real brokers (embedded rumqttd, Debian's mosquitto and nats-server), real sockets,
//! real YAML. One test binary, one module per concern.

mod acl;
mod agents;
mod auth;
mod bad_input;
mod broker_restart;
mod cli;
mod cluster;
mod cluster_crash;
mod common;
mod configs;
mod crash;
mod dashboard;
mod e2e;
mod eval_csv;
mod eval_nab;
mod failover;
mod fleet;
mod forgery;
mod hostile;
mod http_limits;
mod interop;
mod models;
mod nats;
mod nats_mqtt;
mod observe;
mod outage;
mod restart;
mod tls;
mod training;
mod verify;
mod wait;

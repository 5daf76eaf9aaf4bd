//! From [`MqttLink`] to rumqttc: one `MqttOptions` per broker address (primary first, then the
//! alternates) and the client built on the first, so every component maps every field the same way.
//!
//! The password is resolved and the TLS files are read here, once per link; every address shares
//! the TLS configuration. What only a component knows (clean session, manual acks) it sets itself.

use crate::error::LinkError;
use crate::settings::MqttLink;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, TlsConfiguration, Transport};
use std::time::Duration;

/// rumqttc options for every address of `link` (primary first, then the alternates), with the
/// password resolved from the environment and the TLS files read, if configured.
pub fn options(link: &MqttLink, client_id: String) -> Result<Vec<MqttOptions>, LinkError> {
    let tls = match &link.tls {
        Some(t) => Some(t.client_config().map_err(|source| LinkError::Tls {
            broker: link.primary(),
            source,
        })?),
        None => None,
    };
    let password = match &link.username {
        Some(_) => link.resolve_password().map_err(LinkError::Secret)?,
        None => None,
    };
    Ok(link
        .addresses()
        .into_iter()
        .map(|(host, port)| {
            let mut o = MqttOptions::new(client_id.clone(), host, port);
            // keepalive_secs >= 5 and request_channel > 0 are validated, and inflight() is never
            // 0, so rumqttc's asserts on these setters cannot fire.
            o.set_keep_alive(Duration::from_secs(link.keepalive_secs))
                .set_max_packet_size(link.max_packet_bytes, link.max_packet_bytes)
                .set_request_channel_capacity(link.request_channel)
                .set_inflight(link.inflight());
            if let Some(user) = &link.username {
                o.set_credentials(user.clone(), password.clone().unwrap_or_default());
            }
            if let Some(cfg) = &tls {
                o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    cfg.clone(),
                )));
            }
            o
        })
        .collect())
}

/// The client and event loop of a link, connecting to the first of `addresses` (see [`options`]),
/// with a request channel of `request_channel` and no Nagle delay (small messages, latency matters).
pub fn client(addresses: &[MqttOptions], request_channel: usize) -> (AsyncClient, EventLoop) {
    let first = addresses
        .first()
        .cloned()
        .unwrap_or_else(|| MqttOptions::new("edgewatch", "127.0.0.1", 1883));
    let (client, mut eventloop) = AsyncClient::new(first, request_channel);
    eventloop.network_options.set_tcp_nodelay(true);
    (client, eventloop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsSettings;

    #[test]
    fn every_field_of_the_link_reaches_every_address() {
        let link = MqttLink {
            host: "broker.example".into(),
            port: 1884,
            client_id: Some("ignored-here".into()),
            username: Some("u".into()),
            password: Some("pw".into()),
            password_env: None,
            keepalive_secs: 17,
            max_packet_bytes: 4096,
            request_channel: 33,
            max_inflight: Some(5),
            alternates: vec!["10.0.0.2:1885".into(), "[::1]:1886".into()],
            tls: None,
        };
        let opts = options(&link, "cid".into()).unwrap();
        let brokers: Vec<(String, u16)> = opts.iter().map(|o| o.broker_address()).collect();
        assert_eq!(
            brokers,
            vec![
                ("broker.example".to_string(), 1884),
                ("10.0.0.2".to_string(), 1885),
                ("::1".to_string(), 1886)
            ]
        );
        for o in &opts {
            assert_eq!(o.client_id(), "cid");
            assert_eq!(o.keep_alive(), Duration::from_secs(17));
            assert_eq!(o.max_packet_size(), 4096);
            assert_eq!(o.request_channel_capacity(), 33);
            assert_eq!(o.inflight(), 5);
            assert_eq!(
                o.credentials(),
                Some(rumqttc::Login::new("u".to_string(), "pw".to_string()))
            );
            assert!(o.clean_session());
            assert!(matches!(o.transport(), Transport::Tcp));
        }
    }

    #[test]
    fn the_inflight_window_defaults_to_the_request_channel() {
        let link = MqttLink {
            request_channel: 20,
            ..Default::default()
        };
        let o = &options(&link, "c".into()).unwrap()[0];
        assert_eq!(o.inflight(), 20);
        assert_eq!(o.credentials(), None);
        let (_client, eventloop) = client(&options(&link, "c".into()).unwrap(), 20);
        assert_eq!(eventloop.mqtt_options.broker_address().1, 1883);
    }

    #[test]
    fn the_password_comes_from_the_environment_when_configured() {
        let link = MqttLink {
            username: Some("u".into()),
            password_env: Some("EDGEWATCH_LINK_TEST_SURELY_UNSET".into()),
            ..Default::default()
        };
        let e = options(&link, "c".into()).unwrap_err();
        assert!(matches!(e, LinkError::Secret(_)), "{e:?}");
        assert!(e.to_string().contains("EDGEWATCH_LINK_TEST_SURELY_UNSET"));
    }

    #[test]
    fn tls_applies_to_every_address() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, TEST_CA).unwrap();
        let link = MqttLink {
            tls: Some(TlsSettings::with_ca(&ca)),
            alternates: vec!["127.0.0.1:8884".into()],
            ..Default::default()
        };
        let opts = options(&link, "c".into()).unwrap();
        assert_eq!(opts.len(), 2);
        assert!(opts
            .iter()
            .all(|o| matches!(o.transport(), Transport::Tls(_))));
    }

    #[test]
    fn a_missing_ca_file_names_the_broker_the_field_and_the_path() {
        let link = MqttLink {
            port: 8883,
            tls: Some(TlsSettings::with_ca("/nonexistent/edgewatch-ca.pem")),
            ..Default::default()
        };
        let e = options(&link, "c".into()).unwrap_err().to_string();
        assert!(
            e.starts_with("mqtt link to 127.0.0.1:8883: tls.ca_file: cannot read /nonexistent/edgewatch-ca.pem"),
            "{e}"
        );
    }

    /// A self-signed CA certificate (openssl, valid until 2126; nothing connects with it).
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBkzCCATmgAwIBAgIUFzHmEl2HqMchUu+roKMghy0yRG4wCgYIKoZIzj0EAwIw
HjEcMBoGA1UEAwwTZWRnZXdhdGNoLWxpbmstdGVzdDAgFw0yNjEyMDYyMDE1MzNa
GA8yMTI2MTExMjIwMTUzM1owHjEcMBoGA1UEAwwTZWRnZXdhdGNoLWxpbmstdGVz
dDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABLSu2ASdIctjoLznNix08b2ivhxC
mndD/bKZNBRCiR3UejtNN3+Tvgw2UarXJAnYkUiO/WmN6fSDj6qFxPONt8qjUzBR
MB0GA1UdDgQWBBRzOU6aFXOgOoaQ368yU2RilukAbTAfBgNVHSMEGDAWgBRzOU6a
FXOgOoaQ368yU2RilukAbTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gA
MEUCIGdJgxgJQZtAFS/W5vK7plNWp98u48rcdRVKDlxNE8JBAiEAzGnvqIsOe8AV
fUpGzHxtYS7xU/ZhSlIgYhAcrJIIkkk=
-----END CERTIFICATE-----
";
}

//! `GET /metrics` on the admin port serves the counters in the Prometheus
//! text format, with the values the pipeline reached.

mod common;

use std::io::{Read, Write};

use common::*;
use fleetgate::schema::Stream;

fn get_metrics(addr: std::net::SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

fn sample(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {line_start} in\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_the_pipeline() {
    let server = TestServer::start();
    let mut messages = Vec::new();
    for (_, bytes) in examples(Stream::Diagnostics, "valid") {
        let vin = records(&bytes)[0]["vin"].as_str().expect("vin").to_owned();
        messages.push((format!("vehicles/{vin}/diagnostics"), bytes));
    }
    messages.push((
        "vehicles/WMW11DJ04N2T00001/diagnostics".into(),
        b"not json".to_vec(),
    ));
    publish_all(server.handle.mqtt_addr(), &messages).await;
    let metrics = server.handle.metrics().clone();
    wait_for(|| {
        metrics
            .stream(Stream::Diagnostics)
            .table
            .rows_stored
            .load(std::sync::atomic::Ordering::Relaxed)
            == 4
    });

    let text = get_metrics(server.handle.admin_addr());
    assert_eq!(
        sample(
            &text,
            r#"fleetgate_records_stored_total{stream="diagnostics"}"#
        ),
        4.0
    );
    assert_eq!(
        sample(
            &text,
            r#"fleetgate_records_received_total{stream="diagnostics"}"#
        ),
        5.0
    );
    assert_eq!(
        sample(
            &text,
            r#"fleetgate_records_rejected_total{stream="diagnostics",reason="not_json"}"#
        ),
        1.0
    );
    let payload_bytes: usize = messages.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(
        sample(
            &text,
            r#"fleetgate_payload_bytes_received_total{stream="diagnostics"}"#
        ),
        payload_bytes as f64
    );
    assert!(sample(&text, "fleetgate_wal_syncs_total") >= 1.0);
    assert!(sample(&text, "fleetgate_receipt_to_durable_seconds_count") >= 4.0);
    assert!(sample(&text, "fleetgate_receipt_to_queryable_seconds_count") >= 4.0);
    assert!(text.contains(r#"fleetgate_queue_depth{queue="worker-0"}"#));
    assert!(text.contains("# TYPE fleetgate_records_stored_total counter"));
    server.handle.shutdown().expect("shutdown");
}

/// The benchmark sink counts what the broker delivers and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_sink_counts_publishes_and_stores_nothing() {
    let server = TestServer::start_with(|c| c.pipeline.sink = fleetgate::config::SinkKind::Discard);
    let messages: Vec<(String, Vec<u8>)> = examples(Stream::Rtti, "valid")
        .into_iter()
        .map(|(_, bytes)| ("vehicles/WMW11DJ04N2T00001/rtti".to_owned(), bytes))
        .collect();
    publish_all(server.handle.mqtt_addr(), &messages).await;
    let metrics = server.handle.metrics().clone();
    wait_for(|| {
        metrics
            .publishes_discarded
            .load(std::sync::atomic::Ordering::Relaxed)
            == messages.len() as u64
    });
    let text = get_metrics(server.handle.admin_addr());
    assert_eq!(
        sample(&text, "fleetgate_publishes_discarded_total"),
        messages.len() as f64
    );
    let data_dir = server.data_dir();
    let snapshot = server.handle.shutdown().expect("shutdown");
    assert_eq!(snapshot.streams.iter().map(|s| s.received).sum::<u64>(), 0);
    let parquet = files_under(&data_dir)
        .into_iter()
        .filter(|p| is_data_file(p))
        .count();
    assert_eq!(parquet, 0);
}

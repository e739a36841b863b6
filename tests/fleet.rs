//! A fleet as it connects: one MQTT connection per vehicle, each from its
//! own loopback address (`loadgen connections`), against `fleetgate serve`
//! run as a process of its own, so that its resident set is its own.

mod common;

use std::time::Duration;

use common::*;
use fleetgate::schema::Stream;
use loadgen::connections::{Connections, ConnectionsReport};
use loadgen::fleet::Mix;

async fn connect_fleet(
    server: &ServeProcess,
    vehicles: u32,
    every: Option<Duration>,
    hold: Duration,
) -> ConnectionsReport {
    let fleet = Connections {
        server: server.addr,
        vehicles,
        parallel: 256,
        hold,
        every,
        keep_alive_secs: 60,
        server_pid: Some(server.child.id()),
        ready_file: None,
        // No teleservice: its Smart Maintenance records are dropped without
        // consent, which would make stored differ from acknowledged.
        mix: Mix {
            rtti: 90,
            diagnostics: 5,
            charging: 5,
            teleservice: 0,
        },
        seed: 7,
    };
    loadgen::connections::run(&fleet)
        .await
        .expect("the fleet ran")
}

/// An idle vehicle is a socket and a little state. Before fleetgate's
/// patch, rumqttd reserved two 10 KiB socket buffers and queues for some
/// 500 packets per connection, and 2,000 idle vehicles grew the server by
/// about 40 KiB each (the figures per version are in the README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_vehicle_connection_costs_the_broker_under_16_kib() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServeProcess::spawn(dir.path(), "[broker]\nmax_connections = 3000\n");

    let report = connect_fleet(&server, 2000, None, Duration::from_secs(1)).await;

    let c = &report.connect;
    assert_eq!(
        (c.connected, c.refused, c.failed, report.dropped),
        (2000, 0, 0, 0),
        "{report:?}"
    );
    let per_connection = c
        .server_kib_per_connection
        .expect("the server's resident set");
    eprintln!("{per_connection:.1} KiB per idle connection, {report:?}");
    assert!(
        per_connection < 16.0,
        "{per_connection:.1} KiB per idle connection ({report:?})"
    );
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vehicles_on_connections_of_their_own_have_every_acknowledged_record_stored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServeProcess::spawn(dir.path(), "");

    let report = connect_fleet(
        &server,
        300,
        Some(Duration::from_millis(200)),
        Duration::from_secs(2),
    )
    .await;

    let c = &report.connect;
    assert_eq!((c.connected, report.dropped), (300, 0), "{report:?}");
    assert!(report.publishes_sent >= 300, "{report:?}");
    assert_eq!(report.publishes_acked, report.publishes_sent, "{report:?}");
    let stored = || {
        Stream::ALL
            .iter()
            .map(|s| server.rows_stored(s.name()))
            .sum::<u64>()
    };
    wait_for(|| stored() >= report.publishes_acked);
    assert_eq!(stored(), report.publishes_acked);
    server.terminate();
}

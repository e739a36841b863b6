//! loadgen against a broker that is slow to answer CONNECT, as a loaded one
//! is: each of loadgen's connections must connect once and keep that
//! connection. A connection that gave up on a slow CONNACK and connected
//! again under the same client id would make the broker drop one of the two
//! ("duplicate client id"), and the run would lose that connection's
//! acknowledgements.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use loadgen::fleet::Mix;
use loadgen::run::{self, Progress, RunConfig, Stop};
use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long the broker below takes to answer a CONNECT.
const CONNACK_DELAY: Duration = Duration::from_millis(300);

/// What the broker below saw.
#[derive(Default)]
struct Seen {
    connects: AtomicU64,
    publishes: AtomicU64,
}

/// Reads one MQTT packet: its first byte and the rest after the length.
async fn read_packet(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let first = stream.read_u8().await?;
    let mut length = 0usize;
    for shift in (0..28).step_by(7) {
        let byte = stream.read_u8().await?;
        length |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await?;
    Ok((first, body))
}

/// The least of an MQTT 3.1.1 broker: a CONNACK after `CONNACK_DELAY`, a
/// PUBACK for every QoS 1 publish, a PINGRESP for every PINGREQ.
async fn serve(mut stream: TcpStream, seen: Arc<Seen>) -> std::io::Result<()> {
    loop {
        let (first, body) = read_packet(&mut stream).await?;
        match first >> 4 {
            1 => {
                seen.connects.fetch_add(1, Relaxed);
                tokio::time::sleep(CONNACK_DELAY).await;
                stream.write_all(&[0x20, 0x02, 0x00, 0x00]).await?;
            }
            3 => {
                seen.publishes.fetch_add(1, Relaxed);
                if (first >> 1) & 0x03 == 1 {
                    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    let id = &body[2 + topic_len..4 + topic_len];
                    stream.write_all(&[0x40, 0x02, id[0], id[1]]).await?;
                }
            }
            12 => stream.write_all(&[0xd0, 0x00]).await?,
            14 => return Ok(()),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_connects_once_however_slow_the_connack() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let seen = Arc::new(Seen::default());
    let broker_seen = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, broker_seen.clone()));
        }
    });
    let config = RunConfig {
        host: "127.0.0.1".into(),
        port,
        vehicles: 4,
        connections: 2,
        qos: QoS::AtLeastOnce,
        stop: Stop::Publishes(20),
        rate: None,
        records_per_publish: 1,
        inflight: 5,
        mix: Mix::default(),
        seed: 3,
        drain_timeout: Duration::from_secs(10),
    };
    // A connection that keeps giving up on its CONNACK never publishes, and
    // the run would wait for it for ever.
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        run::run(&config, "SLOWCK", Arc::new(Progress::default())),
    )
    .await
    .expect("the run ends")
    .expect("run");
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    assert_eq!(outcome.publishes_acked, 20);
    assert_eq!(seen.connects.load(Relaxed), 2, "one CONNECT per connection");
    assert_eq!(seen.publishes.load(Relaxed), 20);
}

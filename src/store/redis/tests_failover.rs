//! Failovers under load, against real `redis-server` processes the tests start:
//! Redis Sentinel (one master, one replica, three sentinels) and a Redis Cluster
//! with replicas (three masters, three replicas) whose master is killed (SIGKILL)
//! while sign-ins run. Each sign-in creates a challenge and sends two racing
//! answers; during the switch calls fail with UNAVAILABLE and nothing else, after
//! it sign-ins succeed again by themselves, and no challenge ever has two accepted
//! answers. With `wait_replicas` (the cluster test) no acknowledged answer is lost
//! either: answered again after the failover, every one is found, already approved.
//!
//! The cost of `wait_replicas` is measured by `wait_for_a_replica_costs` (ignored:
//! `cargo test --lib wait_for_a_replica_costs -- --ignored --nocapture`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::testing::RedisServer;
use super::{RedisSettings, RedisStore, SentinelSettings};
use crate::domain::challenge::Decision;
use crate::domain::ids::{ChallengeId, DeviceId, TenantId, UserId};
use crate::domain::time::{Clock, ManualClock};
use crate::store::conformance::{policy, sample_challenge};
use crate::store::{CreateOutcome, Store as _, StoreError};

const TENANT: &str = "failover";

/// What one sign-in came to.
#[derive(Clone, Debug)]
enum Outcome {
    /// Created, and exactly one of the two answers acknowledged as accepted.
    Signed(ChallengeId),
    /// A call failed closed.
    Unavailable,
    /// The challenge was created but is gone when answered: a failover lost it.
    Vanished,
    /// Both answers accepted: what must never happen.
    Double(ChallengeId),
    Other(String),
}

struct Event {
    at: Instant,
    outcome: Outcome,
}

fn classify(error: &StoreError) -> Outcome {
    match error {
        StoreError::Unavailable { .. } => Outcome::Unavailable,
        other => Outcome::Other(other.to_string()),
    }
}

/// A sign-in whose phone's answer arrives twice at once (a retry racing the first
/// send, or two replicas).
async fn racing_sign_in(store: &RedisStore, clock: &ManualClock) -> Outcome {
    let now = clock.now();
    let tenant = TenantId(TENANT.to_owned());
    let user = UserId::parse(&format!("u{}", DeviceId::generate().expect("id").as_str())).expect("user");
    let created = match store.create_challenge(sample_challenge(&tenant, &user, now, None), &policy(), now).await {
        Ok(CreateOutcome::Created(challenge)) => challenge,
        Ok(other) => return Outcome::Other(format!("{other:?}")),
        Err(error) => return classify(&error),
    };
    let device = DeviceId::generate().expect("id");
    let answer = || Decision::Approve.resolve(Some(created.number), created.number, device.clone());
    let (first, second) = tokio::join!(
        store.resolve_challenge(&tenant, &created.id, answer(), now),
        store.resolve_challenge(&tenant, &created.id, answer(), now)
    );
    let accepted = [&first, &second].iter().filter(|r| matches!(r, Ok(Some(outcome)) if outcome.accepted)).count();
    match (accepted, &first, &second) {
        (2, ..) => Outcome::Double(created.id),
        (1, ..) => Outcome::Signed(created.id),
        (_, Err(error), _) | (_, _, Err(error)) => classify(error),
        (_, Ok(None), _) | (_, _, Ok(None)) => Outcome::Vanished,
        _ => Outcome::Other("neither answer accepted".to_owned()),
    }
}

/// Sign-ins from `workers` tasks until stopped; every outcome is logged.
struct Load {
    events: Arc<Mutex<Vec<Event>>>,
    count: watch::Receiver<usize>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(store: &Arc<RedisStore>, clock: &ManualClock, workers: usize) -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let (counter, count) = watch::channel(0);
        let counter = Arc::new(counter);
        let stop = CancellationToken::new();
        let tasks = (0..workers)
            .map(|_| {
                let (store, clock, events, counter, stop) =
                    (Arc::clone(store), clock.clone(), Arc::clone(&events), Arc::clone(&counter), stop.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let outcome = racing_sign_in(&store, &clock).await;
                        let failed = !matches!(outcome, Outcome::Signed(_));
                        events.lock().push(Event { at: Instant::now(), outcome });
                        counter.send_modify(|n| *n += 1);
                        if failed {
                            // A failed call came back at once (a refused connection):
                            // do not spin on a dead node while the switch happens.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Self { events, count, stop, tasks }
    }

    /// Waits (at most `within`) until `done` holds for the events so far.
    async fn wait_until(&mut self, within: Duration, what: &str, done: impl Fn(&[Event]) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if done(&self.events.lock()) {
                return;
            }
            if tokio::time::timeout_at(deadline, self.count.changed()).await.is_err() {
                let events = self.events.lock();
                let last: Vec<_> = events.iter().rev().take(5).map(|e| &e.outcome).collect();
                panic!("{what}: not within {within:?} ({} sign-ins; the last: {last:?})", events.len());
            }
        }
    }

    async fn stop(self) -> Vec<Event> {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("a load task");
        }
        Arc::try_unwrap(self.events).map(Mutex::into_inner).unwrap_or_else(|events| std::mem::take(&mut events.lock()))
    }
}

/// Signed sign-ins in a row at the end, all after `since`.
fn trailing_successes(events: &[Event], since: Instant) -> usize {
    events.iter().rev().take_while(|e| e.at > since && matches!(e.outcome, Outcome::Signed(_))).count()
}

/// The summary of a failover run; panics on what must never happen.
struct Verdict {
    signed: Vec<ChallengeId>,
    unavailable: usize,
    vanished: usize,
    /// From the kill to the first sign-in of the unbroken run of successes at the end.
    switch: Duration,
}

fn judge(events: &[Event], killed_at: Instant) -> Verdict {
    let doubles: Vec<&ChallengeId> =
        events.iter().filter_map(|e| if let Outcome::Double(id) = &e.outcome { Some(id) } else { None }).collect();
    assert!(doubles.is_empty(), "challenges with two accepted answers: {doubles:?}");
    let others: Vec<_> = events.iter().filter_map(|e| if let Outcome::Other(o) = &e.outcome { Some(o) } else { None }).collect();
    assert!(others.is_empty(), "failures other than UNAVAILABLE: {others:?}");
    let unavailable = events.iter().filter(|e| matches!(e.outcome, Outcome::Unavailable)).count();
    let last_failure = events.iter().rev().find(|e| !matches!(e.outcome, Outcome::Signed(_))).map_or(killed_at, |e| e.at);
    let recovered = events.iter().find(|e| e.at > last_failure).map_or(last_failure, |e| e.at);
    Verdict {
        signed: events
            .iter()
            .filter_map(|e| if let Outcome::Signed(id) = &e.outcome { Some(id.clone()) } else { None })
            .collect(),
        unavailable,
        vanished: events.iter().filter(|e| matches!(e.outcome, Outcome::Vanished)).count(),
        switch: recovered.saturating_duration_since(killed_at),
    }
}

/// Answers every acknowledged sign-in once more: (accepted again, not found).
async fn answer_again(store: &RedisStore, clock: &ManualClock, signed: &[ChallengeId]) -> (usize, usize) {
    let tenant = TenantId(TENANT.to_owned());
    let (mut accepted, mut missing) = (0, 0);
    for id in signed {
        let number = crate::domain::ids::ChallengeNumber::generate().expect("number");
        let answer = Decision::Deny.resolve(Some(number), number, DeviceId::generate().expect("id"));
        match store.resolve_challenge(&tenant, id, answer, clock.now()).await.expect("the store answers after the failover") {
            Some(outcome) if outcome.accepted => accepted += 1,
            Some(_) => {}
            None => missing += 1,
        }
    }
    (accepted, missing)
}

async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    cmd.query_async(&mut connection).await
}

/// Polls `check` (every 50 ms: the processes change state on their own) until it holds.
async fn eventually<F: Future<Output = bool>>(within: Duration, what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn store_settings(urls: Vec<String>) -> RedisSettings {
    RedisSettings::new(urls, Duration::from_millis(1_000))
}

/// A master and a replica of it that has caught up.
async fn master_and_replica() -> (RedisServer, RedisServer) {
    let master = RedisServer::start().await;
    let of = master.port().to_string();
    let replica = RedisServer::start_with_args(|_| vec!["--replicaof".into(), "127.0.0.1".into(), of]).await;
    let port = replica.port();
    eventually(Duration::from_secs(20), "the replica syncs", || async move {
        query::<String>(port, redis::cmd("INFO").arg("replication"))
            .await
            .is_ok_and(|info| info.contains("master_link_status:up"))
    })
    .await;
    (master, replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_fails_closed_then_signs_in_again_by_itself() {
    let started = Instant::now();
    let (mut master, replica) = master_and_replica().await;
    let master_port = master.port().to_string();
    let mut sentinels = Vec::new();
    for _ in 0..3 {
        let args = [
            ["--sentinel", "monitor", "pm", "127.0.0.1", &master_port, "2"].as_slice(),
            &["--sentinel", "down-after-milliseconds", "pm", "1000"],
            &["--sentinel", "failover-timeout", "pm", "5000"],
        ]
        .concat();
        sentinels.push(RedisServer::start_sentinel(&args).await);
    }
    // The sentinels find each other and the replica through the master (hello
    // messages every two seconds): a failover needs two of them to agree.
    for sentinel in &sentinels {
        let port = sentinel.port();
        eventually(Duration::from_secs(30), "the sentinels know each other and the replica", || async move {
            let master: redis::RedisResult<HashMap<String, String>> =
                query(port, redis::cmd("SENTINEL").arg("MASTER").arg("pm")).await;
            master.is_ok_and(|m| {
                m.get("num-other-sentinels").map(String::as_str) == Some("2")
                    && m.get("num-slaves").map(String::as_str) == Some("1")
            })
        })
        .await;
    }
    let mut settings = store_settings(Vec::new());
    settings.sentinel =
        Some(SentinelSettings { urls: sentinels.iter().map(RedisServer::url).collect(), master: "pm".to_owned() });
    let clock = ManualClock::starting_now();
    let store = Arc::new(RedisStore::connect(settings.clone(), Arc::new(clock.clone())).await.expect("store through Sentinel"));

    let mut load = Load::start(&store, &clock, 8);
    load.wait_until(Duration::from_secs(10), "sign-ins before the failover", |e| trailing_successes(e, started) >= 50).await;
    master.kill().await;
    let killed_at = Instant::now();
    load.wait_until(Duration::from_secs(30), "sign-ins fail closed, then succeed again", |events| {
        events.iter().any(|e| e.at > killed_at && matches!(e.outcome, Outcome::Unavailable))
            && trailing_successes(events, killed_at) >= 50
    })
    .await;
    let events = load.stop().await;
    let verdict = judge(&events, killed_at);
    assert!(verdict.unavailable > 0, "the switch was not seen");
    let new_master = query::<Vec<String>>(sentinels[0].port(), redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg("pm"))
        .await
        .expect("the sentinels name a master");
    assert_eq!(new_master.get(1), Some(&replica.port().to_string()), "the replica is the master now");
    // Without WAIT (wait_replicas = 0) replication is asynchronous: an answer acknowledged
    // in the instant before the kill may not have reached the replica. Counted, not
    // asserted; the cluster test below asserts none with wait_replicas = 1.
    let (again, missing) = answer_again(&store, &clock, &verdict.signed).await;
    eprintln!(
        "sentinel failover: {} sign-ins acknowledged, {} UNAVAILABLE, {} vanished; back {:?} after the kill; \
         answered again: {again} accepted, {missing} missing; the whole test took {:?}",
        verdict.signed.len(),
        verdict.unavailable,
        verdict.vanished,
        verdict.switch,
        started.elapsed()
    );
    assert!(verdict.switch < Duration::from_secs(20), "sign-ins came back only after {:?}", verdict.switch);
}

/// Three masters, each with a replica (`redis-cli --cluster create --cluster-replicas 1`).
async fn cluster_with_replicas() -> Vec<RedisServer> {
    let mut nodes = Vec::new();
    for _ in 0..6 {
        let args = |_| {
            ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000"]
                .map(str::to_owned)
                .to_vec()
        };
        nodes.push(RedisServer::start_with_args(args).await);
    }
    let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
    let output = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .await
        .expect("redis-cli");
    assert!(output.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&output.stdout));
    for node in &nodes {
        let port = node.port();
        eventually(Duration::from_secs(30), "the cluster is up with a synced replica per master", || async move {
            let cluster: String = query(port, redis::cmd("CLUSTER").arg("INFO")).await.unwrap_or_default();
            let replication: String = query(port, redis::cmd("INFO").arg("replication")).await.unwrap_or_default();
            cluster.contains("cluster_state:ok")
                && (replication.contains("connected_slaves:1") || replication.contains("master_link_status:up"))
        })
        .await;
    }
    nodes
}

async fn is_master(port: u16) -> bool {
    query::<redis::Value>(port, &redis::cmd("ROLE"))
        .await
        .is_ok_and(|role| matches!(role, redis::Value::Array(items) if items.first().is_some_and(|r| matches!(r, redis::Value::BulkString(b) if b == b"master"))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_killed_mid_load_loses_no_acknowledged_answer_with_wait() {
    let started = Instant::now();
    let mut nodes = cluster_with_replicas().await;
    let mut settings = store_settings(nodes.iter().map(RedisServer::url).collect());
    settings.wait_replicas = 1;
    settings.wait_timeout = Duration::from_millis(300);
    let clock = ManualClock::starting_now();
    let store = Arc::new(RedisStore::connect(settings.clone(), Arc::new(clock.clone())).await.expect("store on the cluster"));

    let mut load = Load::start(&store, &clock, 8);
    load.wait_until(Duration::from_secs(10), "sign-ins before the kill", |e| trailing_successes(e, started) >= 50).await;
    let mut victim = None;
    for (index, node) in nodes.iter().enumerate() {
        if is_master(node.port()).await {
            victim = Some(index);
            break;
        }
    }
    let victim = victim.expect("a master");
    let master_port = nodes[victim].port();
    // Its replica: the node whose ROLE names the victim's port as its master.
    let mut replica = None;
    for node in &nodes {
        let role: redis::Value = query(node.port(), &redis::cmd("ROLE")).await.expect("ROLE");
        if let redis::Value::Array(items) = role
            && items.get(2).is_some_and(|port| matches!(port, redis::Value::Int(p) if *p == i64::from(master_port)))
        {
            replica = Some(node.port());
        }
    }
    let replica = replica.expect("the master's replica");
    nodes[victim].kill().await;
    let killed_at = Instant::now();
    eventually(Duration::from_secs(20), "the replica is promoted", || is_master(replica)).await;
    // What the node's supervisor does: start it again (empty: nothing is saved). It
    // rejoins as the replica of the promoted node, and the WAITs of its shard succeed.
    nodes[victim].restart().await;
    load.wait_until(Duration::from_secs(30), "sign-ins fail closed, then succeed again", |events| {
        events.iter().any(|e| e.at > killed_at && matches!(e.outcome, Outcome::Unavailable))
            && trailing_successes(events, killed_at) >= 100
    })
    .await;
    let events = load.stop().await;
    let verdict = judge(&events, killed_at);
    let (again, missing) = answer_again(&store, &clock, &verdict.signed).await;
    eprintln!(
        "cluster failover with WAIT 1: {} sign-ins acknowledged, {} UNAVAILABLE, {} vanished; back {:?} after the kill; \
         answered again: {again} accepted, {missing} missing; the whole test took {:?}",
        verdict.signed.len(),
        verdict.unavailable,
        verdict.vanished,
        verdict.switch,
        started.elapsed()
    );
    assert_eq!((again, missing), (0, 0), "acknowledged answers lost in the failover");
    assert_eq!(verdict.vanished, 0, "acknowledged challenges lost in the failover");
    assert!(verdict.switch < Duration::from_secs(20), "sign-ins came back only after {:?}", verdict.switch);
}

/// With `wait_replicas = 1` a write waits for the replica: the price, on a master
/// and its replica on this machine. Prints sign-ins/s and latency for 0 and 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn wait_for_a_replica_costs() {
    let (master, _replica) = master_and_replica().await;
    for (wait, at_once) in [(0, 1), (1, 1), (0, 32), (1, 32), (0, 32), (1, 32)] {
        let mut settings = store_settings(vec![master.url()]);
        settings.wait_replicas = wait;
        settings.operation_timeout = Duration::from_secs(5);
        settings.wait_timeout = Duration::from_secs(1);
        let clock = ManualClock::starting_now();
        let store = Arc::new(RedisStore::connect(settings, Arc::new(clock.clone())).await.expect("store"));
        let histogram = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new(3).expect("histogram")));
        let began = Instant::now();
        let run = Duration::from_secs(4);
        let tasks: Vec<_> = (0..at_once)
            .map(|_| {
                let (store, clock, histogram) = (Arc::clone(&store), clock.clone(), Arc::clone(&histogram));
                tokio::spawn(async move {
                    while began.elapsed() < run {
                        let one = Instant::now();
                        let outcome = racing_sign_in(&store, &clock).await;
                        assert!(matches!(outcome, Outcome::Signed(_)), "{outcome:?}");
                        histogram.lock().record(one.elapsed().as_micros() as u64).expect("record");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        let histogram = histogram.lock();
        let elapsed = began.elapsed().as_secs_f64();
        eprintln!(
            "wait_replicas = {wait}: {:.0} sign-ins/s (create + two racing answers), p50 {} us, p99 {} us, {at_once} at once",
            histogram.len() as f64 / elapsed,
            histogram.value_at_quantile(0.5),
            histogram.value_at_quantile(0.99)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_no_replica_acknowledges_in_time_fails_closed() {
    let (master, replica) = master_and_replica().await;
    let mut settings = store_settings(vec![master.url()]);
    settings.wait_replicas = 1;
    // Long enough for a healthy replica's acknowledgement on a loaded CI machine
    // (200 ms was not, once: the first sign-in below failed as unacknowledged),
    // within an operation timeout longer still, so the frozen replica's write ends
    // as unacknowledged, not as timed out.
    settings.wait_timeout = Duration::from_secs(2);
    settings.operation_timeout = Duration::from_secs(5);
    let clock = ManualClock::starting_now();
    let store = RedisStore::connect(settings, Arc::new(clock.clone())).await.expect("store");
    let outcome = racing_sign_in(&store, &clock).await;
    assert!(matches!(outcome, Outcome::Signed(_)), "{outcome:?}");

    // The replica holds its connection open and answers nothing.
    replica.freeze(true).await;
    let now = clock.now();
    let tenant = TenantId(TENANT.to_owned());
    let user = UserId::parse("frozen-replica").expect("user");
    let error = store
        .create_challenge(sample_challenge(&tenant, &user, now, None), &policy(), now)
        .await
        .expect_err("a write no replica holds is not acknowledged");
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(error.to_string().contains("not acknowledged by enough replicas"), "{error}");
    // Reads wait for nothing.
    let unknown = ChallengeId::generate().expect("id");
    assert_eq!(store.get_challenge(&tenant, &unknown, now).await.expect("a read"), None);

    replica.freeze(false).await;
    let outcome = racing_sign_in(&store, &clock).await;
    assert!(matches!(outcome, Outcome::Signed(_)), "acknowledged again once the replica answers: {outcome:?}");
}

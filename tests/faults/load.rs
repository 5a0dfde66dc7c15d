//! The load of the fault tests: workers that sign in over and over through real
//! tonic clients, each a user with a phone (the pull fallback: no push provider),
//! and the tally every fault test ends with.
//!
//! Each sign-in is CreateChallenge, WatchChallenge, then two answers from the phone
//! at once (two proofs, as a retrying app sends) so `double` can be seen. For each
//! sign-in the tally records how the answers and the watcher ended:
//!
//! - `double`: both answers accepted;
//! - `lost`: an answer accepted, and its watcher ended without APPROVED, with
//!   neither a final state nor an error the fault allows;
//! - `watcher_unavailable`: an answer accepted, and the watcher ended with
//!   UNAVAILABLE (allowed only where the test says so: a killed process);
//! - `codes`: every error status seen, by code.

#![allow(dead_code)] // each test file uses part of the harness

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pushmatch::demo::ApiKeyInterceptor;
use pushmatch::pb;
use pushmatch::pb::challenge_service_client::ChallengeServiceClient;
use pushmatch::phone::{PhoneKey, SimulatedPhone};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

pub const FCM_TOKEN: &str = "fcm-registration-token:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";
/// How long any awaited event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// How the sign-ins of a load ended.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub completed: usize,
    pub accepted: usize,
    pub double: usize,
    pub lost: usize,
    /// An answer accepted, and the watcher ended with UNAVAILABLE or its
    /// connection lost (allowed only where the test says so: a killed process).
    pub watcher_unavailable: usize,
    /// Challenges that read APPROVED to their watcher while no answer was told it
    /// was accepted (the reply was cut off by the fault).
    pub approved_unacknowledged: usize,
    pub codes: BTreeMap<String, usize>,
    /// One message for each code, to read when a test fails.
    pub messages: BTreeMap<String, String>,
    /// Accepted answers: (challenge id, user), for checks after the fault.
    pub accepted_ids: Vec<(String, String)>,
}

/// The connection died under the call (the process is gone): tonic reports it as
/// UNKNOWN "transport error" or "h2 protocol error: ..." for a call under way,
/// CANCELLED "operation was canceled" (hyper's word) for one queued on the
/// connection as it died, UNAVAILABLE for one that cannot connect. It is the
/// client's word, not a status the broker sent.
pub const CONNECTION_LOST: &str = "Unknown(connection lost)";

fn code_name(status: &tonic::Status) -> String {
    let message = status.message();
    let cut = match status.code() {
        Code::Unknown => message == "transport error" || message.starts_with("h2 protocol error"),
        Code::Cancelled => message == "operation was canceled",
        _ => false,
    };
    if cut { CONNECTION_LOST.to_owned() } else { format!("{:?}", status.code()) }
}

impl Tally {
    fn error(&mut self, status: &tonic::Status) {
        *self.codes.entry(code_name(status)).or_default() += 1;
        self.messages.entry(code_name(status)).or_insert_with(|| status.message().to_owned());
    }

    /// Every error code seen, other than those in `allowed` (`Unavailable`, ...,
    /// or [`CONNECTION_LOST`]).
    pub fn unexpected_codes(&self, allowed: &[&str]) -> Vec<String> {
        self.codes.keys().filter(|code| !allowed.contains(&code.as_str())).cloned().collect()
    }

    pub fn count(&self, code: &str) -> usize {
        self.codes.get(code).copied().unwrap_or(0)
    }

    pub fn summary(&self) -> String {
        format!(
            "completed={} accepted={} lost={} double={} watcher_unavailable={} approved_unacknowledged={} codes={:?} {:?}",
            self.completed,
            self.accepted,
            self.lost,
            self.double,
            self.watcher_unavailable,
            self.approved_unacknowledged,
            self.codes,
            self.messages
        )
    }
}

/// One user's side: the IdP's channel and the phone (its key and device id).
pub struct Worker {
    pub user: String,
    pub idp: Channel,
    pub phone_channel: Channel,
    pub key: PhoneKey,
    pub device_id: String,
}

pub fn challenges(channel: &Channel, api_key: &str) -> pushmatch::demo::IdpChallenges {
    ChallengeServiceClient::with_interceptor(channel.clone(), ApiKeyInterceptor::new(api_key).expect("ascii key"))
}

/// How the watcher of a sign-in ended.
enum WatchEnd {
    Final(pb::ChallengeState),
    Error(tonic::Status),
    /// The stream ended with no final state (never right).
    Cut,
}

async fn follow(mut stream: tonic::Streaming<pb::Challenge>) -> WatchEnd {
    let followed = tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.message().await {
                Ok(Some(update)) if update.state() != pb::ChallengeState::Pending => return WatchEnd::Final(update.state()),
                Ok(Some(_)) => {}
                Ok(None) => return WatchEnd::Cut,
                Err(status) => return WatchEnd::Error(status),
            }
        }
    })
    .await;
    followed.unwrap_or_else(|_| panic!("a watcher heard nothing for {DEADLINE:?}"))
}

/// One sign-in; its outcome goes into `tally`. Returns false when a call failed.
/// With `retry`, a phone whose answers both failed answers again (new proofs)
/// until one is answered, as the app does: the watcher then has its final state.
pub async fn sign_in(worker: &Worker, api_key: &str, tally: &Mutex<Tally>, retry: bool) -> bool {
    let mut idp = challenges(&worker.idp, api_key);
    let request = pb::CreateChallengeRequest { user_id: worker.user.clone(), ..Default::default() };
    let challenge = match idp.create_challenge(request).await {
        Ok(challenge) => challenge.into_inner(),
        Err(status) => {
            tally.lock().error(&status);
            return false;
        }
    };
    let watch = match idp
        .watch_challenge(pb::WatchChallengeRequest { challenge_id: challenge.challenge_id.clone(), ..Default::default() })
        .await
    {
        Ok(stream) => stream.into_inner(),
        Err(status) => {
            tally.lock().error(&status);
            return false;
        }
    };
    let watcher = tokio::spawn(follow(watch));
    // Two proofs from one phone (distinct timestamps), sent at once on two clients.
    let phone = || {
        let mut phone = SimulatedPhone::new(worker.phone_channel.clone(), worker.key.clone(), pb::Platform::Fcm, FCM_TOKEN);
        phone.impersonate(&worker.device_id);
        phone
    };
    let (mut one, mut two) = (phone(), phone());
    let fields = [challenge.challenge_id.as_str(), pb::Decision::Approve.as_str_name(), challenge.number.as_str()];
    let (id, number) = (&challenge.challenge_id, &challenge.number);
    let mut failures = Vec::new();
    let (first, second) = tokio::time::timeout(DEADLINE, async {
        loop {
            let (proof_one, proof_two) = (one.proof("RespondToChallenge", &fields), one.proof("RespondToChallenge", &fields));
            let (first, second) = tokio::join!(
                one.respond_with(proof_one, id, pb::Decision::Approve, number),
                two.respond_with(proof_two, id, pb::Decision::Approve, number)
            );
            if !retry || first.is_ok() || second.is_ok() {
                return (first, second);
            }
            failures.extend([first, second].into_iter().filter_map(Result::err));
            // The app's backoff before it answers again (pacing, not synchronisation).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("an answer within {DEADLINE:?}"));
    let end = watcher.await.expect("the watcher task");
    let mut tally = tally.lock();
    let mut accepted = 0;
    let mut failed = !failures.is_empty();
    for status in &failures {
        tally.error(status);
    }
    for result in [first, second] {
        match result {
            Ok(response) => accepted += usize::from(response.accepted),
            Err(status) => {
                tally.error(&status);
                failed = true;
            }
        }
    }
    tally.accepted += accepted;
    if accepted > 1 {
        tally.double += 1;
    }
    if accepted > 0 {
        tally.accepted_ids.push((challenge.challenge_id.clone(), worker.user.clone()));
    }
    match end {
        WatchEnd::Final(pb::ChallengeState::Approved) => {
            if accepted == 0 {
                tally.approved_unacknowledged += 1;
            }
        }
        WatchEnd::Error(status) => {
            tally.error(&status);
            failed = true;
            let cut = status.code() == Code::Unavailable || code_name(&status) == CONNECTION_LOST;
            if accepted > 0 && cut {
                tally.watcher_unavailable += 1;
            } else if accepted > 0 {
                tally.lost += 1;
            }
        }
        WatchEnd::Final(_) | WatchEnd::Cut => {
            if accepted > 0 {
                tally.lost += 1;
            }
        }
    }
    if !failed {
        tally.completed += 1;
    }
    !failed
}

/// Workers signing in until `stop`. Every sign-in, good or not, bumps `events`,
/// so a test waits on the tally changing instead of on a timer.
pub struct Load {
    pub tally: Arc<Mutex<Tally>>,
    pub stop: CancellationToken,
    events: watch::Receiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a worker does after a failed call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Stops: the server it talks to is going away (kill, SIGTERM).
    Stop,
    /// Tries again after a short pause, as a client with backoff does (Redis outage).
    Retry,
}

impl Load {
    pub fn start(workers: Vec<Worker>, api_key: &'static str, on_error: OnError) -> Self {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = CancellationToken::new();
        let (bump, events) = watch::channel(0u64);
        let bump = Arc::new(bump);
        let tasks = workers
            .into_iter()
            .map(|worker| {
                let (tally, stop, bump) = (Arc::clone(&tally), stop.clone(), Arc::clone(&bump));
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let went_well = sign_in(&worker, api_key, &tally, on_error == OnError::Retry).await;
                        bump.send_modify(|n| *n += 1);
                        if went_well {
                            continue;
                        }
                        if on_error == OnError::Stop {
                            return;
                        }
                        // A client's backoff between retries (pacing, not synchronisation).
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        Self { tally, stop, events, tasks }
    }

    /// Waits until `n` more sign-ins than now have gone well.
    pub async fn wait_for_more(&mut self, n: usize) {
        let target = self.tally.lock().completed + n;
        self.wait_until(|tally| tally.completed >= target).await;
    }

    /// Waits until the tally satisfies `condition`, looking again after each sign-in.
    pub async fn wait_until(&mut self, condition: impl Fn(&Tally) -> bool) {
        let tally = Arc::clone(&self.tally);
        let waited = tokio::time::timeout(DEADLINE, self.events.wait_for(|_| condition(&tally.lock()))).await;
        match waited {
            Ok(Ok(_)) => {}
            _ => panic!("the condition within {DEADLINE:?}: {}", self.tally.lock().summary()),
        }
    }

    /// Stops the workers and waits for the sign-ins in flight; returns the tally.
    pub async fn finish(self) -> Tally {
        self.stop.cancel();
        for task in self.tasks {
            tokio::time::timeout(DEADLINE * 2, task).await.expect("the worker ends").expect("the worker");
        }
        self.tally.lock().clone()
    }
}

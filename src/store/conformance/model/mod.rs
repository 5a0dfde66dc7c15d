//! The rules as a model, checked against every store: random sequences of
//! operations through the [`Store`] port, each outcome compared with a small
//! in-memory model of API.md's rules (`rules.rs`).
//!
//! A sequence mixes many users and devices of one tenant (and probes from another):
//! creates with and without a request_id, answers of every kind raced on one
//! challenge (spawned tasks, some with a block racing them), cancels, watches,
//! expiries and clock jumps (the store's [`ManualClock`]), blocks, unblocks,
//! wrong-number strikes, VerifyTotp reservations raced, TOTP steps raced, push and
//! TOTP enrollments (completions raced, keys reused) against the device and
//! open-enrollment caps, device removal and push tokens. What the model holds:
//!
//! - a challenge resolves once: of racing answers at most one is accepted, every
//!   racer reads the same final state, and a final state never changes;
//! - no approval lands while a block is in force (the challenge is cancelled);
//! - per-user pending and window limits, blocks merged (the stronger, longer one);
//! - wrong numbers and VerifyTotp attempts counted in their windows, the locks;
//! - a TOTP step is accepted only past every step before it, once;
//! - a repeated request_id returns the live challenge made for it;
//! - enrollment codes complete once, within the device and open-enrollment caps,
//!   and a public key belongs to one device at a time.
//!
//! Each backend runs it as one test (`model_matches_the_rules`) with
//! [`check`]: a deterministic proptest runner, so a failure is reproducible and
//! shrinks to a minimal sequence, which the panic message prints. More cases:
//!
//! ```text
//! PUSHMATCH_MODEL_SECONDS=3600 cargo test --lib model_matches_the_rules -- --nocapture --test-threads 1
//! ```
//!
//! runs each of the three backends for an hour, in rounds of cases with seeds
//! counting up from `PUSHMATCH_MODEL_SEED` (default fixed); `PUSHMATCH_MODEL_CASES`
//! (or `PROPTEST_CASES`) sets the cases of a round. The outcomes seen are printed at
//! the end, to show what the sequences reached. Each case runs on a runtime of its
//! own and a fresh [`Scope`], so the Redis backends share one server (one cluster)
//! across cases.

// Test support: a failed expectation here is a failed test, so panicking is the point.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod driver;
mod rules;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

use super::{Fixture, Scope};
use crate::domain::time::ManualClock;

/// Users of the tenant under test.
pub const USERS: usize = 4;

/// How an answer reaches a challenge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    ApproveRight,
    ApproveWrong,
    Deny,
    ReportFraud,
    /// The IdP's CancelChallenge.
    Cancel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Fraud,
    /// A wrong-numbers block of this many seconds.
    ForSecs(u32),
}

/// The public key of a device being enrolled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyChoice {
    Fresh,
    /// The key of device `n` (of every device added so far, removed ones too).
    SameAs(usize),
}

/// One step of a sequence. Indices (`challenge`, `device`, `enrollment`) pick among
/// those made so far, counted from the newest (0) and modulo their number; a step
/// with none to pick is skipped.
#[derive(Clone, Debug)]
pub enum Op {
    /// `racers` creates at once, with the same request_id (or none).
    Create {
        user: usize,
        request: Option<u8>,
        ttl_secs: u32,
        racers: usize,
    },
    /// One of a few device proofs, used by `racers` calls at once.
    SpendProof {
        proof: u8,
        racers: usize,
    },
    Get {
        challenge: usize,
        other_tenant: bool,
    },
    /// Answers raced on one challenge, with a block of its user racing them.
    Answer {
        challenge: usize,
        answers: Vec<Answer>,
        block: Option<BlockKind>,
    },
    Watch {
        challenge: usize,
    },
    Pending {
        user: usize,
    },
    Advance {
        millis: u64,
    },
    Block {
        user: usize,
        kind: BlockKind,
    },
    Unblock {
        user: usize,
    },
    WrongNumber {
        user: usize,
    },
    ReserveTotp {
        user: usize,
        racers: usize,
    },
    TotpSucceeded {
        user: usize,
    },
    /// TOTP steps (1000 + each) raced on one device.
    SpendTotpStep {
        device: usize,
        steps: Vec<u8>,
    },
    BeginEnrollment {
        user: usize,
        totp: bool,
    },
    CompleteEnrollment {
        enrollment: usize,
        racers: usize,
        key: KeyChoice,
        other_tenant: bool,
    },
    RemoveDevice {
        device: usize,
        other_tenant: bool,
    },
    ListDevices {
        user: usize,
    },
    PushToken {
        device: usize,
        token: u8,
        disable: bool,
    },
}

fn block_kind() -> impl Strategy<Value = BlockKind> {
    prop_oneof![Just(BlockKind::Fraud), prop::sample::select(vec![60u32, 300, 3600]).prop_map(BlockKind::ForSecs)]
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        3 => Just(Answer::ApproveRight),
        1 => Just(Answer::ApproveWrong),
        1 => Just(Answer::Deny),
        1 => Just(Answer::ReportFraud),
        1 => Just(Answer::Cancel),
    ]
}

/// Clock jumps: around every boundary the rules have (a second, the TTLs, the
/// windows, the retention) and far past them.
fn advance() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..2_000,
        prop::sample::select(vec![
            29_999u64,
            30_000,
            59_999,
            60_000,
            120_000,
            299_999,
            300_000,
            600_000,
            900_000,
            3_600_000,
            6 * 3_600_000,
        ]),
    ]
}

pub fn op() -> impl Strategy<Value = Op> {
    // Most steps on one user and on the newest items, so sequences reach the limits.
    let user = prop_oneof![2 => Just(0), 1 => 0..USERS];
    let index = prop_oneof![2 => Just(0usize), 1 => 0usize..8];
    prop_oneof![
        8 => (
            user.clone(),
            prop::option::weighted(0.4, 0u8..2),
            prop::sample::select(vec![30u32, 60, 300]),
            prop_oneof![3 => Just(1usize), 1 => 2usize..4],
        )
            .prop_map(|(user, request, ttl_secs, racers)| Op::Create { user, request, ttl_secs, racers }),
        1 => (0u8..3, 1usize..4).prop_map(|(proof, racers)| Op::SpendProof { proof, racers }),
        3 => (index.clone(), prop::bool::weighted(0.1)).prop_map(|(challenge, other_tenant)| Op::Get { challenge, other_tenant }),
        8 => (index.clone(), prop::collection::vec(answer(), 1..5), prop::option::weighted(0.2, block_kind()))
            .prop_map(|(challenge, answers, block)| Op::Answer { challenge, answers, block }),
        2 => index.clone().prop_map(|challenge| Op::Watch { challenge }),
        2 => user.clone().prop_map(|user| Op::Pending { user }),
        6 => advance().prop_map(|millis| Op::Advance { millis }),
        1 => (user.clone(), block_kind()).prop_map(|(user, kind)| Op::Block { user, kind }),
        3 => user.clone().prop_map(|user| Op::Unblock { user }),
        4 => user.clone().prop_map(|user| Op::WrongNumber { user }),
        4 => (user.clone(), 1usize..4).prop_map(|(user, racers)| Op::ReserveTotp { user, racers }),
        2 => user.clone().prop_map(|user| Op::TotpSucceeded { user }),
        4 => (index.clone(), prop::collection::vec(0u8..6, 1..4))
            .prop_map(|(device, steps)| Op::SpendTotpStep { device, steps }),
        4 => (user.clone(), prop::bool::weighted(0.3)).prop_map(|(user, totp)| Op::BeginEnrollment { user, totp }),
        5 => (
            index.clone(),
            1usize..4,
            prop_oneof![3 => Just(KeyChoice::Fresh), 1 => index.clone().prop_map(KeyChoice::SameAs)],
            prop::bool::weighted(0.1),
        )
            .prop_map(|(enrollment, racers, key, other_tenant)| Op::CompleteEnrollment { enrollment, racers, key, other_tenant }),
        2 => (index.clone(), prop::bool::weighted(0.2)).prop_map(|(device, other_tenant)| Op::RemoveDevice { device, other_tenant }),
        1 => user.prop_map(|user| Op::ListDevices { user }),
        1 => (index, 0u8..3, any::<bool>()).prop_map(|(device, token, disable)| Op::PushToken { device, token, disable }),
    ]
}

/// How many cases: `PUSHMATCH_MODEL_CASES`, else `PROPTEST_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    ["PUSHMATCH_MODEL_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|name| std::env::var(name).ok())
        .map_or(default, |raw| raw.trim().parse().unwrap_or_else(|_| panic!("cases {raw:?} is not a number")))
}

/// The runner's seed: `PUSHMATCH_MODEL_SEED`, else a fixed one (the same sequences
/// on every run, so a failure in CI fails again on a laptop).
fn seed() -> u64 {
    std::env::var("PUSHMATCH_MODEL_SEED").map_or(0x7075_7368_6d61_7463, |raw| {
        raw.trim().parse().unwrap_or_else(|_| panic!("PUSHMATCH_MODEL_SEED {raw:?} is not a number"))
    })
}

/// How long to keep drawing rounds of cases: `PUSHMATCH_MODEL_SECONDS`, else one round.
fn budget() -> Option<std::time::Duration> {
    std::env::var("PUSHMATCH_MODEL_SECONDS").ok().map(|raw| {
        std::time::Duration::from_secs(
            raw.trim().parse().unwrap_or_else(|_| panic!("PUSHMATCH_MODEL_SECONDS {raw:?} is not a number")),
        )
    })
}

/// Runs `default_cases` random sequences (see [`cases`]) against stores from
/// `factory`, each compared step by step with the model, in rounds with seeds
/// `seed`, `seed + 1`, ... until [`budget`] has passed; panics with the minimal
/// failing sequence.
pub fn check<F, Fut, X>(backend: &str, default_cases: u32, factory: F)
where
    F: Fn(ManualClock) -> Fut,
    Fut: Future<Output = X>,
    X: Fixture + Send + Sync + 'static,
{
    let (cases, first_seed, budget) = (cases(default_cases), seed(), budget());
    let started = Instant::now();
    let mut seed = first_seed;
    loop {
        round(backend, cases, seed, &factory);
        if budget.is_none_or(|budget| started.elapsed() >= budget) {
            break;
        }
        seed = seed.wrapping_add(1);
    }
    let total = u64::from(cases) * (seed.wrapping_sub(first_seed) + 1);
    eprintln!(
        "model on {backend}: {total} cases passed in {:.1?} (seeds {first_seed}..={seed}); outcomes seen:",
        started.elapsed()
    );
    for (outcome, count) in driver::take_seen() {
        eprintln!("  {count:>9}  {outcome}");
    }
}

/// One proptest run of `cases` sequences from `seed`.
fn round<F, Fut, X>(backend: &str, cases: u32, seed: u64, factory: &F)
where
    F: Fn(ManualClock) -> Fut,
    Fut: Future<Output = X>,
    X: Fixture + Send + Sync + 'static,
{
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let result = runner.run(&prop::collection::vec(op(), 1..64), |ops| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
        runtime.block_on(async {
            let clock = ManualClock::starting_now();
            let scope = Scope::unique();
            let fixture = Arc::new(factory(clock.clone()).await);
            driver::run(fixture, &clock, &scope, &ops).await.map_err(TestCaseError::fail)
        })
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => panic!(
            "{backend} broke a rule: {reason}\nminimal sequence ({} steps; PUSHMATCH_MODEL_SEED={seed} \
             PUSHMATCH_MODEL_CASES={cases} draws it again):\n{ops:#?}",
            ops.len()
        ),
        Err(TestError::Abort(reason)) => panic!("model on {backend} aborted: {reason}"),
    }
}

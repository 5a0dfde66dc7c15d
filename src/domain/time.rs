//! Time as an input. The domain never reads the system clock itself: it asks a
//! [`Clock`], so tests drive expiry, rate windows and clock skew without sleeping.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch: the one time type of the domain and the stores
/// (it serializes as a plain integer, so Redis scripts can compare it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Millis(pub i64);

impl Millis {
    pub fn plus(self, duration: Duration) -> Millis {
        Millis(self.0.saturating_add(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)))
    }

    pub fn minus(self, duration: Duration) -> Millis {
        Millis(self.0.saturating_sub(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)))
    }

    /// How long from `self` until `later`; zero when `later` is not later.
    pub fn until(self, later: Millis) -> Duration {
        Duration::from_millis(u64::try_from(later.0.saturating_sub(self.0)).unwrap_or(0))
    }

    pub fn as_unix_seconds(self) -> i64 {
        self.0.div_euclid(1000)
    }
}

pub type BoxSleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The source of "now" and of timers.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Millis;
    /// Resolves once `now() >= deadline`.
    fn sleep_until(&self, deadline: Millis) -> BoxSleep;
}

/// The real clock: wall time for timestamps, tokio timers for waiting.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Millis(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }

    fn sleep_until(&self, deadline: Millis) -> BoxSleep {
        let wait = self.now().until(deadline);
        Box::pin(tokio::time::sleep(wait))
    }
}

#[cfg(any(test, feature = "test-util"))]
pub use manual::ManualClock;

#[cfg(any(test, feature = "test-util"))]
mod manual {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::watch;

    use super::{BoxSleep, Clock, Millis};

    /// A clock that moves only when a test says so. Sleepers wake as soon as
    /// [`ManualClock::advance`] carries the time past their deadline.
    #[derive(Clone, Debug)]
    pub struct ManualClock {
        now: Arc<watch::Sender<Millis>>,
    }

    impl ManualClock {
        pub fn new(start: Millis) -> Self {
            Self { now: Arc::new(watch::Sender::new(start)) }
        }

        /// Starts at the real wall time, so device proofs signed with the real time pass
        /// the skew check until the test moves the clock.
        pub fn starting_now() -> Self {
            Self::new(super::SystemClock.now())
        }

        pub fn advance(&self, by: Duration) {
            self.now.send_modify(|now| *now = now.plus(by));
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Millis {
            *self.now.borrow()
        }

        fn sleep_until(&self, deadline: Millis) -> BoxSleep {
            let mut changes = self.now.subscribe();
            Box::pin(async move {
                // An error means the clock is gone: nobody can advance it any more.
                let _ = changes.wait_for(|now| *now >= deadline).await;
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_is_zero_for_the_past() {
        assert_eq!(Millis(5_000).until(Millis(4_000)), Duration::ZERO);
        assert_eq!(Millis(4_000).until(Millis(5_500)), Duration::from_millis(1_500));
    }

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_when_advanced_past_their_deadline() {
        let clock = ManualClock::new(Millis(1_000));
        let sleeper = tokio::spawn(clock.sleep_until(Millis(61_000)));
        clock.advance(Duration::from_secs(30));
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(30));
        tokio::time::timeout(Duration::from_secs(5), sleeper).await.expect("sleeper woke").expect("sleeper task ran");
    }
}

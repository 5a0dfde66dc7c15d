//! When to look at files again without a restart: on SIGHUP, every `interval`
//! (the caller then checks whether the files changed), or when a caller inside the
//! process asks ([`ReloadHandle`]: tests, which cannot send SIGHUP to one server
//! of the many in their process). The TLS certificates (`crate::tls`) and the
//! configuration's tenants (`crate::server::reload`) both wait here.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Why a reload is due.
#[derive(Debug)]
pub enum Trigger {
    /// SIGHUP: reload whether or not the files look changed.
    Signal,
    /// The polling interval passed: reload if the files changed.
    Tick,
    /// A caller asked, and waits for the outcome (the message of a failure).
    Asked(oneshot::Sender<Result<(), String>>),
}

/// Asks for a reload and hears how it went; cheap to clone.
#[derive(Clone, Debug)]
pub struct ReloadHandle {
    requests: mpsc::Sender<oneshot::Sender<Result<(), String>>>,
}

/// The receiving end of a [`ReloadHandle`], given to the task that reloads.
#[derive(Debug)]
pub struct ReloadRequests(mpsc::Receiver<oneshot::Sender<Result<(), String>>>);

/// A handle and the requests it sends.
pub fn channel() -> (ReloadHandle, ReloadRequests) {
    let (requests, receiver) = mpsc::channel(4);
    (ReloadHandle { requests }, ReloadRequests(receiver))
}

impl ReloadHandle {
    /// Reloads now; the error says why the new files were refused (the old ones
    /// are still in force then).
    pub async fn reload(&self) -> Result<(), String> {
        let (answer, outcome) = oneshot::channel();
        self.requests.send(answer).await.map_err(|_| "the server has stopped".to_owned())?;
        outcome.await.map_err(|_| "the server stopped before reloading".to_owned())?
    }
}

/// SIGHUP, a polling interval and the in-process requests, merged.
pub struct Triggers {
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
    interval: Duration,
    requests: Option<ReloadRequests>,
}

impl Triggers {
    /// `interval` zero: no polling. `what` names the files in the warning when
    /// SIGHUP cannot be listened for.
    pub fn new(what: &str, interval: Duration, requests: Option<ReloadRequests>) -> Self {
        #[cfg(unix)]
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, what, "cannot listen for SIGHUP; reloading on file change only");
                None
            }
        };
        Self {
            #[cfg(unix)]
            hangup,
            interval,
            requests,
        }
    }

    /// The next reason to reload; `None` once `stop` fires.
    pub async fn next(&mut self, stop: &CancellationToken) -> Option<Trigger> {
        #[cfg(unix)]
        let hangup = async {
            match self.hangup.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let interval = self.interval;
        let tick = async {
            if interval.is_zero() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(interval).await;
        };
        let asked = async {
            match self.requests.as_mut() {
                Some(ReloadRequests(receiver)) => match receiver.recv().await {
                    Some(answer) => answer,
                    // Every handle is gone: no more requests, keep the other triggers.
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => None,
            () = hangup => Some(Trigger::Signal),
            () = tick => Some(Trigger::Tick),
            answer = asked => Some(Trigger::Asked(answer)),
        }
    }
}

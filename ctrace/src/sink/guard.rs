//! Outputs that may fail without stopping the tracer: a recording on a
//! /tmp that fills, a textfile whose directory goes away. ctrace is run
//! while a machine is in trouble; losing one output must not lose the
//! others, the metrics endpoint, or the trace itself.
use std::time::{Duration, Instant};

use super::{Sink, Snapshot};
use crate::{aggregate::DropRecord, connects::ConnectFailure};

/// After a failure, writes are skipped for this long, then tried again.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// A sink's health, for the summary: JSON `sink_errors`, Prometheus
/// `ctrace_sink_errors_total`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkHealth {
    pub name: &'static str,
    /// Writes that failed or were skipped while the sink was failing.
    pub errors: u64,
    /// The last failure, while the sink has not written since.
    pub failing: Option<String>,
}

pub struct Guarded {
    inner: Box<dyn Sink>,
    health: SinkHealth,
    retry_at: Option<Instant>,
}

impl Guarded {
    pub fn new(name: &'static str, inner: Box<dyn Sink>) -> Guarded {
        Guarded {
            inner,
            health: SinkHealth {
                name,
                errors: 0,
                failing: None,
            },
            retry_at: None,
        }
    }

    /// Runs one write unless the sink is waiting to retry; a failure is
    /// said once on stderr and counted, a recovery is said too.
    fn write(&mut self, f: impl FnOnce(&mut dyn Sink) -> std::io::Result<()>) {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            self.health.errors += 1;
            return;
        }
        match f(self.inner.as_mut()) {
            Ok(()) => {
                if self.health.failing.take().is_some() {
                    eprintln!("ctrace: {} writes again", self.health.name);
                }
                self.retry_at = None;
            }
            Err(e) => {
                self.health.errors += 1;
                let e = e.to_string();
                if self.health.failing.as_deref() != Some(e.as_str()) {
                    eprintln!(
                        "ctrace: {} failed: {e}; tracing goes on, retrying every {} s",
                        self.health.name,
                        RETRY_AFTER.as_secs()
                    );
                }
                self.health.failing = Some(e);
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
            }
        }
    }
}

impl Sink for Guarded {
    fn dropped_flow(&mut self, rec: &DropRecord) -> std::io::Result<()> {
        self.write(|s| s.dropped_flow(rec));
        Ok(())
    }

    fn connect_failure(&mut self, rec: &ConnectFailure) -> std::io::Result<()> {
        self.write(|s| s.connect_failure(rec));
        Ok(())
    }

    fn summary(&mut self, snap: &Snapshot<'_>) -> std::io::Result<()> {
        self.write(|s| s.summary(snap));
        Ok(())
    }

    fn health(&self) -> Option<SinkHealth> {
        Some(self.health.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    };

    use super::*;

    /// Fails while `broken` is set, counts the writes that reach it.
    struct Flaky {
        broken: Arc<AtomicBool>,
        reached: Arc<AtomicU32>,
    }

    impl Sink for Flaky {
        fn dropped_flow(&mut self, _: &DropRecord) -> std::io::Result<()> {
            self.reached.fetch_add(1, Ordering::Relaxed);
            if self.broken.load(Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        }

        fn summary(&mut self, _: &Snapshot<'_>) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_output_is_counted_paused_and_retried() {
        let broken = Arc::new(AtomicBool::new(true));
        let reached = Arc::new(AtomicU32::new(0));
        let mut g = Guarded::new(
            "--record",
            Box::new(Flaky {
                broken: broken.clone(),
                reached: reached.clone(),
            }),
        );
        let rec = DropRecord {
            time: std::time::SystemTime::UNIX_EPOCH,
            flow: crate::event::Flow {
                netns: 7,
                proto: crate::event::Proto::Tcp,
                src: "10.10.0.3:40000".parse().unwrap(),
                dst: "10.10.1.2:22".parse().unwrap(),
            },
            service: Some("ssh".into()),
            pods: Default::default(),
            cause: crate::cause::Cause::TableFull,
            evidence: "test",
            tcp_flags: 2,
            strategy: crate::tier::Strategy::Tracepoint,
        };
        for _ in 0..5 {
            g.dropped_flow(&rec).unwrap();
        }
        let h = g.health().unwrap();
        assert_eq!(h.errors, 5);
        assert!(h.failing.unwrap().contains("No space left"));
        assert_eq!(
            reached.load(Ordering::Relaxed),
            1,
            "paused after the failure"
        );

        broken.store(false, Ordering::Relaxed);
        g.retry_at = Some(Instant::now());
        g.dropped_flow(&rec).unwrap();
        let h = g.health().unwrap();
        assert_eq!((h.errors, h.failing), (5, None));
        assert_eq!(reached.load(Ordering::Relaxed), 2);
    }
}

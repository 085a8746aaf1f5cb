//! Admission of new connections per source address: how many may be open at once and
//! how fast new ones may arrive.
//!
//! The device listener checks every accepted socket here before spawning a task for it,
//! so a storm from one address is turned away with a `close()` in the accept loop and
//! costs nobody else a thing. The global cap (`mqtt.max_connections`) stays a semaphore
//! in the driver; this table adds the per-source rules:
//!
//! * at most `max_per_source` connections open from one source;
//! * new connections from one source through a [`TokenBucket`] (`connect_rate` per
//!   second, bursts of `connect_burst`), so a device fleet behind one NAT reconnecting
//!   after a restart gets in within seconds, while a loop hammering the port is slowed
//!   to the rate.
//!
//! A "source" is the IPv4 address, or the IPv6 /64 (one subscriber's prefix: a single
//! host can pick any address in it). IPv4-mapped IPv6 addresses count as IPv4.
//!
//! The table forgets a source once it has no connection open and its bucket is full
//! again, on a sweep at most every [`SWEEP_EVERY`]; it holds at most `max_sources`
//! entries, beyond which newcomers are admitted untracked (the global cap still holds).
//! Each source is reported as an offender once while it is remembered.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::TokenBucket;

/// How often forgotten sources are swept from the table.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The per-source rules (0 switches a rule off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    pub max_per_source: u32,
    pub connect_rate: u32,
    pub connect_burst: u32,
    /// Sources remembered at most.
    pub max_sources: usize,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_per_source` connections are already open from this source.
    TooManyFromSource,
    /// New connections from this source arrive faster than the rate allows.
    ConnectRate,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::TooManyFromSource => "too many connections from this address",
            Refusal::ConnectRate => "connecting too fast from this address",
        }
    }
}

/// The answer for one accepted socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; `tracked` says whether [`Admission::release`] must be called for it.
    Admit { tracked: bool },
    /// Refused; `first` is true the first time this source is refused (log it then).
    Refuse { why: Refusal, first: bool },
}

#[derive(Debug)]
struct Source {
    live: u32,
    bucket: TokenBucket,
    refused_before: bool,
}

/// The per-source table.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    sources: HashMap<IpAddr, Source>,
    last_sweep: Instant,
}

/// The key a source is counted under.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits, now: Instant) -> Self {
        Admission {
            limits,
            sources: HashMap::new(),
            last_sweep: now,
        }
    }

    /// Decides on a socket accepted from `ip` at `now`.
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Decision {
        let limits = self.limits;
        if limits.max_per_source == 0 && limits.connect_rate == 0 {
            return Decision::Admit { tracked: false };
        }
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_EVERY {
            self.sweep(now);
        }
        let key = source_key(ip);
        if !self.sources.contains_key(&key) && self.sources.len() >= limits.max_sources {
            return Decision::Admit { tracked: false };
        }
        let source = self.sources.entry(key).or_insert_with(|| Source {
            live: 0,
            bucket: TokenBucket::new(limits.connect_rate, limits.connect_burst, now),
            refused_before: false,
        });
        let refusal = if limits.max_per_source != 0 && source.live >= limits.max_per_source {
            Some(Refusal::TooManyFromSource)
        } else if !source.bucket.try_take(now) {
            Some(Refusal::ConnectRate)
        } else {
            None
        };
        match refusal {
            Some(why) => Decision::Refuse {
                why,
                first: !std::mem::replace(&mut source.refused_before, true),
            },
            None => {
                source.live += 1;
                Decision::Admit { tracked: true }
            }
        }
    }

    /// A tracked connection from `ip` has closed.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(source) = self.sources.get_mut(&source_key(ip)) {
            source.live = source.live.saturating_sub(1);
        }
    }

    /// Connections open from `ip`'s source.
    pub fn live(&self, ip: IpAddr) -> u32 {
        self.sources.get(&source_key(ip)).map_or(0, |s| s.live)
    }

    /// Sources remembered.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        self.sources
            .retain(|_, s| s.live > 0 || !s.bucket.is_full(now));
    }
}

/// [`Admission`] shared by a listener's accept loop and its connection tasks.
#[derive(Debug, Clone)]
pub struct SharedAdmission(Arc<Mutex<Admission>>);

/// A tracked connection's place in the table, given back when dropped.
#[derive(Debug)]
pub struct SourceSlot {
    admission: Option<SharedAdmission>,
    ip: IpAddr,
}

impl SharedAdmission {
    pub fn new(limits: AdmissionLimits) -> Self {
        SharedAdmission(Arc::new(Mutex::new(Admission::new(limits, Instant::now()))))
    }

    /// Decides on a socket from `ip`; an admitted one holds its slot until dropped.
    pub fn admit(&self, ip: IpAddr) -> Result<SourceSlot, (Refusal, bool)> {
        let decision = self.lock().admit(ip, Instant::now());
        match decision {
            Decision::Admit { tracked } => Ok(SourceSlot {
                admission: tracked.then(|| self.clone()),
                ip,
            }),
            Decision::Refuse { why, first } => Err((why, first)),
        }
    }

    /// Connections open from `ip`'s source.
    pub fn live(&self, ip: IpAddr) -> u32 {
        self.lock().live(ip)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Admission> {
        // The table holds counts only; a panic elsewhere cannot leave it inconsistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            admission.lock().release(self.ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const LIMITS: AdmissionLimits = AdmissionLimits {
        max_per_source: 3,
        connect_rate: 2,
        connect_burst: 5,
        max_sources: 100,
    };

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn caps_open_connections_per_source_only() {
        let t = Instant::now();
        let mut a = Admission::new(LIMITS, t);
        for _ in 0..3 {
            assert_eq!(a.admit(ip(1), t), Decision::Admit { tracked: true });
        }
        assert_eq!(
            a.admit(ip(1), t),
            Decision::Refuse {
                why: Refusal::TooManyFromSource,
                first: true
            }
        );
        assert_eq!(
            a.admit(ip(1), t),
            Decision::Refuse {
                why: Refusal::TooManyFromSource,
                first: false
            }
        );
        // Another address is untouched.
        assert_eq!(a.admit(ip(2), t), Decision::Admit { tracked: true });
        a.release(ip(1));
        assert_eq!(a.admit(ip(1), t), Decision::Admit { tracked: true });
    }

    #[test]
    fn rate_limits_new_connections_after_the_burst() {
        let t = Instant::now();
        let limits = AdmissionLimits {
            max_per_source: 0,
            ..LIMITS
        };
        let mut a = Admission::new(limits, t);
        let admitted = (0..20)
            .filter(|_| matches!(a.admit(ip(1), t), Decision::Admit { .. }))
            .count();
        assert_eq!(admitted, 5);
        let later = t + Duration::from_secs(2);
        let admitted = (0..20)
            .filter(|_| matches!(a.admit(ip(1), later), Decision::Admit { .. }))
            .count();
        assert_eq!(admitted, 4);
    }

    #[test]
    fn forgets_quiet_sources_and_warns_again() {
        let t = Instant::now();
        let mut a = Admission::new(LIMITS, t);
        for _ in 0..5 {
            a.admit(ip(1), t);
            a.release(ip(1));
        }
        assert!(matches!(
            a.admit(ip(1), t),
            Decision::Refuse { first: true, .. }
        ));
        assert_eq!(a.sources(), 1);
        // Quiet for long enough: swept, and a new episode is reported afresh.
        let later = t + SWEEP_EVERY + Duration::from_secs(10);
        a.admit(ip(9), later);
        assert_eq!(a.sources(), 1, "ip(1) swept, ip(9) added");
        assert_eq!(a.live(ip(1)), 0);
    }

    #[test]
    fn bounded_table_admits_newcomers_untracked() {
        let t = Instant::now();
        let limits = AdmissionLimits {
            max_sources: 2,
            ..LIMITS
        };
        let mut a = Admission::new(limits, t);
        assert_eq!(a.admit(ip(1), t), Decision::Admit { tracked: true });
        assert_eq!(a.admit(ip(2), t), Decision::Admit { tracked: true });
        assert_eq!(a.admit(ip(3), t), Decision::Admit { tracked: false });
        assert_eq!(a.sources(), 2);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), ip(1));
    }

    #[test]
    fn all_rules_off_tracks_nothing() {
        let t = Instant::now();
        let limits = AdmissionLimits {
            max_per_source: 0,
            connect_rate: 0,
            ..LIMITS
        };
        let mut a = Admission::new(limits, t);
        assert!((0..1000).all(|_| a.admit(ip(1), t) == Decision::Admit { tracked: false }));
        assert_eq!(a.sources(), 0);
    }

    #[test]
    fn slots_give_their_place_back() {
        let shared = SharedAdmission::new(LIMITS);
        let slots: Vec<_> = (0..3).map(|_| shared.admit(ip(1)).unwrap()).collect();
        assert!(matches!(
            shared.admit(ip(1)),
            Err((Refusal::TooManyFromSource, true))
        ));
        drop(slots);
        assert_eq!(shared.live(ip(1)), 0);
    }
}

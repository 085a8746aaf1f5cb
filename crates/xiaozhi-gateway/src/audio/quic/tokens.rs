//! One-time session tokens: the hello hands one to the device, its QUIC connection
//! presents it to claim the conversation. Pure bookkeeping with `now` passed in.
//!
//! A token is redeemed at most once and only before it expires; a redeemed or expired
//! token is remembered until its expiry (plus the TTL) so that a second presentation is
//! told apart from a guess in the metrics. The table is bounded by the number of live
//! conversations: a token is issued per hello and revoked when its conversation ends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::protocol::quic_framing::TOKEN_LEN;

/// A session token.
pub type Token = [u8; TOKEN_LEN];

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Never issued (or long forgotten): a guess or a typo.
    Unknown,
    /// Already redeemed by an earlier connection.
    Reused,
    /// Issued, but not presented within its TTL.
    Expired,
    /// Its conversation ended before a connection presented it.
    Ended,
}

impl TokenRefusal {
    pub fn label(self) -> &'static str {
        match self {
            TokenRefusal::Unknown => "unknown_token",
            TokenRefusal::Reused => "reused_token",
            TokenRefusal::Expired => "expired_token",
            TokenRefusal::Ended => "conversation_ended",
        }
    }
}

struct Pending<T> {
    value: T,
    expires: Instant,
}

/// Tokens and what each one claims (`T`: the conversation's attach slot).
pub struct TokenTable<T> {
    ttl: Duration,
    pending: HashMap<Token, Pending<T>>,
    /// Redeemed or expired tokens, until this instant.
    spent: HashMap<Token, (TokenRefusal, Instant)>,
}

impl<T> TokenTable<T> {
    pub fn new(ttl: Duration) -> Self {
        TokenTable {
            ttl,
            pending: HashMap::new(),
            spent: HashMap::new(),
        }
    }

    /// Registers `token` (random, chosen by the caller) for `value`. False if the token is
    /// already in use (the caller draws another).
    pub fn issue(&mut self, token: Token, value: T, now: Instant) -> bool {
        if self.pending.contains_key(&token) || self.spent.contains_key(&token) {
            return false;
        }
        self.pending.insert(
            token,
            Pending {
                value,
                expires: now + self.ttl,
            },
        );
        true
    }

    /// Claims a token: its value, once.
    pub fn redeem(&mut self, token: &Token, now: Instant) -> Result<T, TokenRefusal> {
        if let Some((why, _)) = self.spent.get(token) {
            return Err(*why);
        }
        let Some(p) = self.pending.remove(token) else {
            return Err(TokenRefusal::Unknown);
        };
        if now >= p.expires {
            self.spent
                .insert(*token, (TokenRefusal::Expired, p.expires + self.ttl));
            return Err(TokenRefusal::Expired);
        }
        self.spent
            .insert(*token, (TokenRefusal::Reused, now + self.ttl));
        Ok(p.value)
    }

    /// A token whose conversation has ended (redeemed or not): presenting it from now on
    /// is told `Ended` (until it would have expired, plus the TTL).
    pub fn revoke(&mut self, token: &Token, now: Instant) {
        if let Some(p) = self.pending.remove(token) {
            let until = p.expires.max(now) + self.ttl;
            self.spent.insert(*token, (TokenRefusal::Ended, until));
        }
    }

    /// Drops expired entries; returns how many pending tokens expired unused.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let mut expired = Vec::new();
        self.pending.retain(|t, p| {
            let keep = now < p.expires;
            if !keep {
                expired.push((*t, p.expires));
            }
            keep
        });
        self.spent.retain(|_, (_, until)| now < *until);
        let n = expired.len();
        for (t, at) in expired {
            self.spent.insert(t, (TokenRefusal::Expired, at + self.ttl));
        }
        n
    }

    /// How long a token stays good.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Tokens waiting to be redeemed.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn a_token_is_good_once_and_only_in_time() {
        let t0 = Instant::now();
        let mut table = TokenTable::new(TTL);
        assert!(table.issue([1; TOKEN_LEN], "a", t0));
        assert!(!table.issue([1; TOKEN_LEN], "b", t0));
        assert_eq!(
            table.redeem(&[2; TOKEN_LEN], t0),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            table.redeem(&[1; TOKEN_LEN], t0 + Duration::from_secs(1)),
            Ok("a")
        );
        assert_eq!(
            table.redeem(&[1; TOKEN_LEN], t0 + Duration::from_secs(2)),
            Err(TokenRefusal::Reused)
        );
        assert!(table.issue([3; TOKEN_LEN], "c", t0));
        assert_eq!(
            table.redeem(&[3; TOKEN_LEN], t0 + TTL),
            Err(TokenRefusal::Expired)
        );
        assert_eq!(
            table.redeem(&[3; TOKEN_LEN], t0 + TTL),
            Err(TokenRefusal::Expired)
        );
    }

    #[test]
    fn sweep_expires_and_forgets() {
        let t0 = Instant::now();
        let mut table = TokenTable::new(TTL);
        table.issue([1; TOKEN_LEN], (), t0);
        table.issue([2; TOKEN_LEN], (), t0 + TTL);
        assert_eq!(table.sweep(t0 + TTL), 1);
        assert_eq!(table.pending(), 1);
        assert_eq!(
            table.redeem(&[1; TOKEN_LEN], t0 + TTL),
            Err(TokenRefusal::Expired)
        );
        // Long after, the spent entry is gone too: the table does not grow forever.
        table.revoke(&[2; TOKEN_LEN], t0 + TTL);
        assert_eq!(
            table.redeem(&[2; TOKEN_LEN], t0 + TTL),
            Err(TokenRefusal::Ended)
        );
        table.sweep(t0 + TTL * 10);
        assert_eq!(
            table.redeem(&[1; TOKEN_LEN], t0 + TTL * 10),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(table.pending(), 0);
    }
}

//! Shared copies of identical text: devices of one firmware build announce the same MCP
//! `initialize` result and the same tools, so a fleet of ten thousand holds each text
//! once instead of once per connection.
//!
//! Texts nobody else holds any more are swept when the set has doubled since the last
//! sweep, so the set stays proportional to the distinct texts in use.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

/// Sweep no more often than when the set reaches this size.
const MIN_SWEEP_AT: usize = 1024;

struct Interned {
    texts: HashSet<Arc<str>>,
    sweep_at: usize,
}

static INTERNED: LazyLock<Mutex<Interned>> = LazyLock::new(|| {
    Mutex::new(Interned {
        texts: HashSet::new(),
        sweep_at: MIN_SWEEP_AT,
    })
});

/// The shared copy of `text`.
pub fn intern(text: &str) -> Arc<str> {
    let mut interned = INTERNED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(shared) = interned.texts.get(text) {
        return shared.clone();
    }
    if interned.texts.len() >= interned.sweep_at {
        interned.texts.retain(|t| Arc::strong_count(t) > 1);
        interned.sweep_at = (interned.texts.len() * 2).max(MIN_SWEEP_AT);
    }
    let shared: Arc<str> = Arc::from(text);
    interned.texts.insert(shared.clone());
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_share_one_copy_and_unused_ones_are_swept() {
        let a = intern("{\"name\":\"self.audio_speaker.set_volume\"}");
        let b = intern(&String::from(
            "{\"name\":\"self.audio_speaker.set_volume\"}",
        ));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &intern("{\"name\":\"other\"}")));
        // Fill past the sweep threshold with texts nobody keeps; `a` must survive.
        for i in 0..(MIN_SWEEP_AT * 3) {
            intern(&format!("unused-{i}"));
        }
        let len = INTERNED.lock().unwrap().texts.len();
        assert!(len < MIN_SWEEP_AT * 3, "swept: {len}");
        assert!(Arc::ptr_eq(
            &a,
            &intern("{\"name\":\"self.audio_speaker.set_volume\"}")
        ));
    }
}

//! Response cache: normalised query + every resolved generation option -> response.
//! Generation is deterministic for equal keys (sampling is seeded), so a hit is exactly what
//! the engine would have answered.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use qreformulate::pb;

use crate::engine::SearchKind;
use crate::validate::ValidRequest;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SearchKey {
    Greedy,
    Beam { num_beams: usize, num_return_sequences: usize },
    // f32 has no Eq/Hash; the bit pattern is exact, and -0.0/NaN never get this far.
    Sample { num_return_sequences: usize, temperature_bits: u32, seed: u64 },
}

/// Everything the answer depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    query: String,
    max_new_tokens: usize,
    search: SearchKey,
    ignore_eos: bool,
    unguarded: bool,
    truncate: bool,
}

impl CacheKey {
    pub fn new(req: &ValidRequest) -> Self {
        let search = match req.params.search {
            SearchKind::Greedy => SearchKey::Greedy,
            SearchKind::Beam { num_beams, num_return_sequences } => SearchKey::Beam { num_beams, num_return_sequences },
            SearchKind::Sample { num_return_sequences, temperature, seed } => {
                SearchKey::Sample { num_return_sequences, temperature_bits: temperature.to_bits(), seed }
            }
        };
        Self {
            query: req.query.clone(),
            max_new_tokens: req.params.max_new_tokens,
            search,
            ignore_eos: req.params.ignore_eos,
            unguarded: req.params.unguarded,
            truncate: req.truncate,
        }
    }
}

/// Hit/miss counts since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
}

pub struct ResponseCache {
    inner: Option<moka::sync::Cache<CacheKey, Arc<pb::ReformulateResponse>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ResponseCache {
    /// `capacity` 0 disables caching.
    pub fn new(capacity: u64) -> Self {
        Self {
            inner: (capacity > 0).then(|| moka::sync::Cache::new(capacity)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn get(&self, key: &CacheKey) -> Option<Arc<pb::ReformulateResponse>> {
        let cache = self.inner.as_ref()?;
        let found = cache.get(key);
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    pub fn insert(&self, key: CacheKey, response: pb::ReformulateResponse) {
        if let Some(cache) = &self.inner {
            cache.insert(key, Arc::new(response));
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            // moka counts entries lazily; settle pending inserts so the count is current.
            entries: self.inner.as_ref().map_or(0, |c| {
                c.run_pending_tasks();
                c.entry_count()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::GenerationParams;

    fn req(query: &str, search: SearchKind, max_new_tokens: usize) -> ValidRequest {
        ValidRequest {
            query: query.into(),
            params: GenerationParams { max_new_tokens, search, ignore_eos: false, unguarded: false },
            truncate: false,
        }
    }

    #[test]
    fn key_covers_every_option() {
        let base = req("q", SearchKind::Greedy, 64);
        let k = CacheKey::new(&base);
        assert_eq!(k, CacheKey::new(&base.clone()));
        let mut variants = vec![
            req("Q", SearchKind::Greedy, 64), // case matters to the model
            req("q", SearchKind::Greedy, 65),
            req("q", SearchKind::Beam { num_beams: 2, num_return_sequences: 1 }, 64),
            req("q", SearchKind::Sample { num_return_sequences: 1, temperature: 1.0, seed: 1 }, 64),
            req("q", SearchKind::Sample { num_return_sequences: 1, temperature: 0.5, seed: 1 }, 64),
            req("q", SearchKind::Sample { num_return_sequences: 1, temperature: 1.0, seed: 2 }, 64),
        ];
        let mut eos = base.clone();
        eos.params.ignore_eos = true;
        variants.push(eos);
        let mut truncate = base.clone();
        truncate.truncate = true;
        variants.push(truncate);
        let mut unguarded = base.clone();
        unguarded.params.unguarded = true;
        variants.push(unguarded);
        for v in &variants {
            assert_ne!(CacheKey::new(v), k, "{v:?}");
        }
    }

    #[test]
    fn hit_and_miss_are_counted() {
        let cache = ResponseCache::new(10);
        let key = CacheKey::new(&req("q", SearchKind::Greedy, 64));
        assert!(cache.get(&key).is_none());
        cache.insert(key.clone(), pb::ReformulateResponse { subqueries: vec!["a".into()], ..Default::default() });
        assert_eq!(cache.get(&key).unwrap().subqueries, vec!["a"]);
        let s = cache.stats();
        assert_eq!((s.hits, s.misses), (1, 1));
    }

    #[test]
    fn zero_capacity_disables() {
        let cache = ResponseCache::new(0);
        let key = CacheKey::new(&req("q", SearchKind::Greedy, 64));
        cache.insert(key.clone(), pb::ReformulateResponse::default());
        assert!(cache.get(&key).is_none());
        assert!(!cache.enabled());
        assert_eq!(cache.stats(), CacheStats::default());
    }
}

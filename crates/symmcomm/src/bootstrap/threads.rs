//! The in-process store: ranks are threads of one process sharing a map behind a mutex.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::Store;
use crate::error::Result;

/// A [`Store`] for ranks that are threads of one process.
#[derive(Debug, Default)]
pub struct ThreadStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl ThreadStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // A panic in another rank's thread while holding the lock leaves the map consistent
        // (every critical section is a single insert, remove or read), so keep going.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for ThreadStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock().insert(key.to_string(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Option<Vec<u8>>> {
        let mut map = self.lock();
        loop {
            if let Some(v) = map.get(key) {
                return Ok(Some(v.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            map = self
                .changed
                .wait_timeout(map, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let mut map = self.lock();
        let cur = map
            .get(key)
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(i64::from_le_bytes)
            .unwrap_or(0);
        let new = cur + delta;
        map.insert(key.to_string(), new.to_le_bytes().to_vec());
        drop(map);
        self.changed.notify_all();
        Ok(new)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.lock().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn get_waits_for_set() {
        let s = Arc::new(ThreadStore::new());
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            s2.set("k", b"v").unwrap();
        });
        let v = s.get("k", Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(v.as_deref(), Some(&b"v"[..]));
        t.join().unwrap();
    }

    #[test]
    fn get_times_out() {
        let s = ThreadStore::new();
        let t0 = Instant::now();
        let v = s.get("absent", t0 + Duration::from_millis(30)).unwrap();
        assert!(v.is_none());
        assert!(t0.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn add_counts() {
        let s = ThreadStore::new();
        assert_eq!(s.add("c", 2).unwrap(), 2);
        assert_eq!(s.add("c", 3).unwrap(), 5);
        s.delete("c").unwrap();
        assert_eq!(s.add("c", 1).unwrap(), 1);
    }
}

//! The rendezvous and the store on threads of this process over loopback: the happy path, the
//! failures every rank must see, foreign services on the port, and how rank 0's store closes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::client::GRACE;
use super::wire::{Failure, MAX_FRAME, Reply, Request, VERSION, read_frame};
use super::*;
use crate::bootstrap::Store;

fn cfg(rank: usize, world: usize, port: u16, timeout_ms: u64) -> RendezvousConfig {
    RendezvousConfig {
        addr: "127.0.0.1".into(),
        port,
        rank,
        world_size: world,
        timeout: Duration::from_millis(timeout_ms),
    }
}

/// Rendezvous of `cfgs` on threads; rank 0 (if present) starts first.
fn meet(cfgs: Vec<RendezvousConfig>) -> Vec<Result<TcpStore>> {
    thread::scope(|s| {
        let hs: Vec<_> = cfgs
            .into_iter()
            .map(|c| s.spawn(move || TcpStore::rendezvous(&c)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rendezvous thread panicked"))
            .collect()
    })
}

/// `world` ranks that met on a free port, each rendezvous deadline `timeout_ms`.
fn stores(world: usize, timeout_ms: u64) -> Vec<TcpStore> {
    let port = free_port("127.0.0.1").unwrap();
    meet(
        (0..world)
            .map(|r| cfg(r, world, port, timeout_ms))
            .collect(),
    )
    .into_iter()
    .collect::<Result<_>>()
    .unwrap()
}

#[test]
fn rendezvous_and_store_on_threads() {
    let port = free_port("127.0.0.1").unwrap();
    let stores: Vec<TcpStore> = meet((0..3).map(|r| cfg(r, 3, port, 5000)).collect())
        .into_iter()
        .collect::<Result<_>>()
        .unwrap();
    thread::scope(|s| {
        for st in &stores {
            s.spawn(move || {
                let r = st.rank();
                st.set(&format!("k{r}"), format!("v{r}").as_bytes())
                    .unwrap();
                let dl = Instant::now() + Duration::from_secs(5);
                for o in 0..3 {
                    let v = st.get(&format!("k{o}"), dl).unwrap();
                    assert_eq!(v, Some(format!("v{o}").into_bytes()));
                }
                st.add("n", 1).unwrap();
            });
        }
    });
    assert_eq!(stores[1].add("n", 0).unwrap(), 3);
    // A get that expires answers None in time and leaves the connection usable.
    let t0 = Instant::now();
    let v = stores[2]
        .get("absent", t0 + Duration::from_millis(100))
        .unwrap();
    assert!(v.is_none());
    assert!(t0.elapsed() >= Duration::from_millis(100));
    assert!(t0.elapsed() < Duration::from_millis(100) + GRACE);
    stores[2].delete("k0").unwrap();
    assert_eq!(
        stores[0]
            .get("k0", Instant::now() + Duration::from_millis(10))
            .unwrap(),
        None
    );
    let overflow = stores[0].add("n", i64::MAX).unwrap_err().to_string();
    assert!(overflow.contains("overflow"), "{overflow}");
    // Still usable after a refused request.
    assert_eq!(stores[0].add("n", 1).unwrap(), 4);
    // A value over the frame cap is refused before it is sent.
    let big = vec![0u8; MAX_FRAME];
    assert!(matches!(
        stores[1].set("big", &big),
        Err(Error::InvalidArgument { .. })
    ));
    stores[1].set("small", b"ok").unwrap();
    // Rank 0's store stops once the others have left.
    for st in stores.into_iter().rev() {
        drop(st);
    }
    // The port is free again once rank 0's store is gone.
    TcpListener::bind(("127.0.0.1", port)).unwrap();
}

#[test]
fn single_rank_on_any_port() {
    let st = TcpStore::rendezvous(&cfg(0, 1, 0, 2000)).unwrap();
    assert!(!st.master().ends_with(":0"), "{}", st.master());
    st.set("a", b"b").unwrap();
    assert_eq!(
        st.get("a", Instant::now()).unwrap().as_deref(),
        Some(&b"b"[..])
    );
}

#[test]
fn wrong_world_size_reaches_everyone() {
    let port = free_port("127.0.0.1").unwrap();
    let res = meet(vec![
        cfg(0, 3, port, 3000),
        cfg(1, 2, port, 3000),
        cfg(2, 3, port, 3000),
    ]);
    for (r, x) in res.into_iter().enumerate() {
        match x {
            Err(Error::WrongWorldSize {
                rank: 1,
                expected: 3,
                got: 2,
            }) => {}
            other => panic!("rank {r}: {other:?}"),
        }
    }
}

#[test]
fn local_rank_checks() {
    assert!(matches!(
        TcpStore::rendezvous(&cfg(2, 2, 1, 100)),
        Err(Error::RankOutOfRange { rank: 2, world: 2 })
    ));
    assert!(matches!(
        TcpStore::rendezvous(&cfg(0, 0, 1, 100)),
        Err(Error::RankOutOfRange { rank: 0, world: 0 })
    ));
}

#[test]
fn client_rejects_a_foreign_service() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = thread::spawn(move || {
        for answer in [
            &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
            &[3, 0, 0, 0, 0x99, 0, 0],
        ] {
            let (mut s, _) = l.accept().unwrap();
            let mut hello = [0u8; 64];
            let _ = s.read(&mut hello);
            s.write_all(answer).unwrap();
        }
    });
    for expect in ["cap", "0x99"] {
        match TcpStore::rendezvous(&cfg(1, 2, port, 2000)) {
            Err(Error::Malformed {
                rank: 1, detail, ..
            }) => {
                assert!(detail.contains(expect), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }
    t.join().unwrap();
}

#[test]
fn silent_master_times_out() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        thread::sleep(Duration::from_millis(1500));
        drop(s);
    });
    let t0 = Instant::now();
    match TcpStore::rendezvous(&cfg(1, 2, port, 300)) {
        Err(Error::Timeout { detail, .. }) => {
            assert!(detail.contains("no welcome"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_millis(300) + GRACE + Duration::from_millis(200));
    t.join().unwrap();
}

#[test]
fn other_protocol_version_is_told_why() {
    let port = free_port("127.0.0.1").unwrap();
    let rank0 = thread::spawn(move || TcpStore::rendezvous(&cfg(0, 2, port, 1500)));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut s = loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            break s;
        }
        assert!(Instant::now() < deadline, "master never came up");
        thread::sleep(Duration::from_millis(5));
    };
    let hello = Request::Hello {
        version: VERSION + 1,
        rank: 1,
        world: 2,
        wait_ms: 1000,
    };
    s.write_all(&hello.encode().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let p = read_frame(&mut s, MAX_FRAME).unwrap();
    match Reply::decode(&p).unwrap() {
        Reply::Failed(Failure::Other { reason }) => {
            let theirs = format!("version {}", VERSION + 1);
            assert!(reason.contains(&theirs), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Rank 0 then times out, naming the stray connection.
    match rank0.join().unwrap() {
        Err(Error::Timeout { detail, .. }) => {
            assert!(
                detail.contains("[1] never arrived") && detail.contains("malformed"),
                "{detail}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_rank_that_leaves_before_the_welcome_fails_everyone() {
    let port = free_port("127.0.0.1").unwrap();
    let leaver = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut s = loop {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                break s;
            }
            assert!(Instant::now() < deadline, "master never came up");
            thread::sleep(Duration::from_millis(5));
        };
        let hello = Request::Hello {
            version: VERSION,
            rank: 2,
            world: 3,
            wait_ms: 3000,
        };
        s.write_all(&hello.encode().unwrap()).unwrap();
        thread::sleep(Duration::from_millis(50));
        // Dies without waiting for the welcome.
    });
    let t0 = Instant::now();
    let rank0 = thread::spawn(move || TcpStore::rendezvous(&cfg(0, 3, port, 3000)));
    leaver.join().unwrap();
    thread::sleep(Duration::from_millis(300));
    let rank1 = TcpStore::rendezvous(&cfg(1, 3, port, 3000));
    let res = vec![rank0.join().unwrap(), rank1];
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    for (r, x) in res.into_iter().enumerate() {
        match x {
            Err(Error::RendezvousFailed { rank, reason }) => {
                assert_eq!(rank, r);
                assert!(
                    reason.contains("rank 2") && reason.contains("closed"),
                    "{reason}"
                );
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
}

/// Rank 0 finishes first and drops its store while rank 1 still has its last reads to do:
/// the master stays until rank 1 has left, so the reads are answered.
#[test]
fn rank0_stays_until_the_others_leave() {
    let mut all = stores(2, 5000);
    let s1 = all.pop().unwrap();
    let s0 = all.pop().unwrap();
    s0.set("last", b"from rank 0").unwrap();
    let rank0 = thread::spawn(move || {
        drop(s0);
        Instant::now()
    });
    thread::sleep(Duration::from_millis(300));
    let got = s1.get("last", Instant::now() + Duration::from_secs(2));
    assert_eq!(got.unwrap().as_deref(), Some(&b"from rank 0"[..]));
    s1.set("after", b"still served").unwrap();
    let left = Instant::now();
    drop(s1);
    let stopped = rank0.join().unwrap();
    assert!(stopped >= left, "rank 0's store stopped before rank 1 left");
}

/// A rank that stays connected does not hold rank 0 past its deadline: the master stops, and
/// a get blocked on it fails at once, naming the request, instead of waiting out its own wait.
#[test]
fn a_blocked_get_fails_when_rank0_stops_at_its_deadline() {
    let mut all = stores(2, 800);
    let s1 = all.pop().unwrap();
    let s0 = all.pop().unwrap();
    let t0 = Instant::now();
    let h = thread::spawn(move || s1.get("never", Instant::now() + Duration::from_secs(5)));
    thread::sleep(Duration::from_millis(100));
    drop(s0);
    let r = h.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    match r {
        Err(Error::RendezvousFailed { rank: 1, reason }) => {
            assert!(reason.contains("get 'never'"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

/// A farewell returns once every rank has said farewell or left; a rank whose connection
/// closed (it dropped its store, or died) is not waited for.
#[test]
fn farewell_waits_for_the_others_but_not_for_the_departed() {
    let mut all = stores(3, 5000);
    drop(all.pop().unwrap());
    let (s0, s1) = (&all[0], &all[1]);
    let said = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|s| {
        let rank0 = s.spawn(|| {
            s0.farewell(Instant::now() + Duration::from_secs(5))
                .unwrap();
            said.load(std::sync::atomic::Ordering::SeqCst)
        });
        // The waiting farewell leaves the connection to rank 0's other threads between slices.
        thread::sleep(Duration::from_millis(50));
        s0.set("meanwhile", b"rank 0 still works").unwrap();
        assert!(
            !rank0.is_finished(),
            "rank 0's farewell did not wait for rank 1"
        );
        thread::sleep(Duration::from_millis(150));
        said.store(true, std::sync::atomic::Ordering::SeqCst);
        s1.farewell(Instant::now() + Duration::from_secs(5))
            .unwrap();
        assert!(
            rank0.join().unwrap(),
            "rank 0's farewell returned before rank 1's"
        );
    });
    // A second round is a barrier of its own.
    let err = s0
        .farewell(Instant::now() + Duration::from_millis(200))
        .unwrap_err();
    match err {
        Error::Timeout { detail, .. } => {
            assert!(
                detail.contains("rank(s) [1] neither said farewell"),
                "{detail}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The store still works after a farewell that timed out.
    s1.set("k", b"v").unwrap();
    while let Some(st) = all.pop() {
        drop(st);
    }
}

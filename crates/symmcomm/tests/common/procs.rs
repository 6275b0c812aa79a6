//! Child processes for tests that need real ranks: this test binary run again
//! (`current_exe() --exact <child test> --nocapture`) with environment naming its role; its
//! output lines arrive on a channel, and it is killed if dropped while running.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The environment variable that names a child's role; without it the child tests return at once.
pub const ROLE: &str = "SYMMCOMM_TEST_CHILD";

/// Whether this process is a child in `role`.
pub fn role_is(role: &str) -> bool {
    std::env::var(ROLE).as_deref() == Ok(role)
}

/// A number the parent passed to this child in `name`.
pub fn env_u64(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("child needs {name}"))
}

/// Milliseconds since the Unix epoch: a clock every process of the host shares.
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The rest of `line` after `key` (the harness may print its own words before ours).
pub fn after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.find(key).map(|i| &line[i + key.len()..])
}

/// A running child.
pub struct Proc {
    pub name: String,
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run the test `test` of this binary as a child named `name` with `env` added.
pub fn spawn(name: &str, test: &str, env: &[(&str, String)]) -> Proc {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env_remove("LOCAL_RANK")
        .env_remove("LOCAL_WORLD_SIZE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn child");
    let (tx, rx) = mpsc::channel();
    let pipes: Vec<(Box<dyn Read + Send>, &str)> = vec![
        (Box::new(child.stdout.take().expect("stdout")), ""),
        (Box::new(child.stderr.take().expect("stderr")), "stderr: "),
    ];
    for (pipe, tag) in pipes {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(format!("{tag}{line}")).is_err() {
                    break;
                }
            }
        });
    }
    Proc {
        name: name.to_string(),
        child,
        lines: rx,
        seen: Vec::new(),
    }
}

impl Proc {
    /// Wait for a line containing `key`, at most until `deadline`; panics with the output so
    /// far when none comes.
    pub fn wait_line(&mut self, key: &str, deadline: Instant) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(key) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "{}: no line with {key:?}; output so far:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Wait for the process to exit (killing it at `deadline`, which fails the test) and
    /// return all its output.
    pub fn finish(mut self, deadline: Instant) -> Vec<String> {
        loop {
            match self.child.try_wait().expect("try_wait") {
                Some(_) => break,
                None if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let rest: Vec<String> = self.lines.try_iter().collect();
                    self.seen.extend(rest);
                    panic!(
                        "{}: still running at its deadline (a hang); output:\n{}",
                        self.name,
                        self.seen.join("\n")
                    );
                }
                None => thread::sleep(Duration::from_millis(10)),
            }
        }
        let drain = Instant::now() + Duration::from_secs(5);
        while let Ok(l) = self
            .lines
            .recv_timeout(drain.saturating_duration_since(Instant::now()))
        {
            self.seen.push(l);
        }
        std::mem::take(&mut self.seen)
    }
}

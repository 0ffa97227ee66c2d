//! The real `catraca` binary: one-shot commands, and a `serve` process whose stdout and stderr are kept
//! for the test to read.

use std::io::{BufRead, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::helpers::{TestApp, repo};

/// Longest a command may run before the test gives up on it (generous: CI machines are loaded).
const CLI_DEADLINE: Duration = Duration::from_secs(120);

/// The `catraca` binary with a chosen environment and working folder. Variables named `CATRACA_*` that
/// the test process happens to have are not passed on, so each run sees only what the test sets.
#[derive(Clone)]
pub struct Cli {
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
}

impl Cli {
    pub fn new() -> Self {
        Self {
            env: vec![("CATRACA_LOG".into(), "error".into())],
            // Not the checkout's root: no `catraca.toml` or `.env` of a developer's is read.
            cwd: Some(repo("tests")),
        }
    }

    /// The CLI on a test gateway's database, with the example policy and executors (the test app adds
    /// executor kinds only the harness knows).
    pub fn for_app(app: &TestApp) -> Self {
        Self::on(&app.db_url(), app.dir.path(), "cli-test")
    }

    /// The CLI on `database_url` with the example policy and executors, an audit folder of its own
    /// under `dir` (also its working folder, so no `catraca.toml` or `.env` of the checkout is read),
    /// and its own instance id.
    pub fn on(database_url: &str, dir: &Path, instance_id: &str) -> Self {
        Self::new()
            .env("CATRACA_DATABASE_URL", database_url)
            .env(
                "CATRACA_POLICIES_DIR",
                repo("policies").display().to_string(),
            )
            .env(
                "CATRACA_EXECUTORS_DIR",
                repo("executors").display().to_string(),
            )
            .env(
                "CATRACA_AUDIT_DIR",
                dir.join(format!("audit-{instance_id}"))
                    .display()
                    .to_string(),
            )
            .env("CATRACA_INSTANCE_ID", instance_id)
            .cwd(dir)
    }

    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_owned(), value.into()));
        self
    }

    pub fn without(mut self, name: &str) -> Self {
        self.env.retain(|(k, _)| k != name);
        self
    }

    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    /// `catraca` with exactly this environment (no inherited `CATRACA_*`) and working folder.
    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_catraca"));
        for (name, _) in std::env::vars() {
            if name.starts_with("CATRACA_") {
                cmd.env_remove(name);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1");
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        cmd
    }

    /// Runs `catraca args` to its end (bounded by [`CLI_DEADLINE`]), whatever its exit code.
    pub fn output(&self, args: &[&str]) -> Output {
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                pipe.read_to_end(&mut buf).unwrap();
                buf
            })
        };
        let stdout = drain(Box::new(child.stdout.take().unwrap()));
        let stderr = drain(Box::new(child.stderr.take().unwrap()));
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > CLI_DEADLINE {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("catraca {args:?} still running after {CLI_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        }
    }

    /// Runs `catraca args` and insists that it succeeds.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "catraca {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn stdout(&self, args: &[&str]) -> String {
        String::from_utf8(self.run(args).stdout).unwrap()
    }
}

/// Everything a command printed, for assertion messages and searches.
pub fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Drops terminal colour sequences (`ESC [ … letter`), should a build print them anyway.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Everything a stream printed so far, whole lines only.
fn collect(stream: impl std::io::Read + Send + 'static) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    let handle = std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    });
    (text, handle)
}

/// A running `catraca serve` on a free loopback port.
pub struct Serve {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    pub addr: SocketAddr,
}

/// How long a start or a stop may take on a loaded machine before the test gives up.
const PROCESS_DEADLINE: Duration = Duration::from_secs(60);

impl Serve {
    /// Starts `serve` and waits until it logs the address it listens on (needs `CATRACA_LOG` at
    /// `info` or finer for the `catraca` target).
    pub fn start(cli: &Cli) -> Self {
        let mut child = cli
            .command()
            .env("CATRACA_LISTEN", "127.0.0.1:0")
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (stdout, out_reader) = collect(child.stdout.take().unwrap());
        let (stderr, err_reader) = collect(child.stderr.take().unwrap());
        let mut serve = Self {
            child,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let deadline = Instant::now() + PROCESS_DEADLINE;
        loop {
            let addr = serve.stderr().lines().find_map(|line| {
                let (_, after) = line.split_once("catraca listening")?;
                if let Some((_, rest)) = after.split_once("\"addr\":\"") {
                    // CATRACA_LOG_FORMAT=json
                    return rest.split('"').next()?.parse::<SocketAddr>().ok();
                }
                let (_, rest) = after.split_once("addr=")?;
                rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
            });
            if let Some(addr) = addr {
                serve.addr = addr;
                return serve;
            }
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!(
                    "serve exited {status} before listening:\n{}",
                    serve.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "serve did not start:\n{}",
                serve.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Its stderr so far, exactly as written.
    pub fn raw_stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Its stderr so far, without colour sequences.
    pub fn stderr(&self) -> String {
        strip_ansi(&self.stderr.lock().unwrap())
    }

    /// Waits until its stderr satisfies `done`.
    pub fn wait_for_stderr(&self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + PROCESS_DEADLINE;
        while !done(&self.stderr()) {
            assert!(
                Instant::now() < deadline,
                "serve never printed {what}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends it a signal by name (`HUP`, `TERM`, ...) with the kill program.
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name} failed");
    }

    /// Stops it as an operator would (SIGTERM: drain, flush the trail) and returns its whole stdout
    /// and stderr.
    pub fn stop(mut self) -> (String, String) {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success(), "kill -TERM failed");
        let deadline = Instant::now() + PROCESS_DEADLINE;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("serve did not stop on SIGTERM:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        let stdout = strip_ansi(&self.stdout.lock().unwrap());
        (stdout, self.stderr())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // A test that failed half-way must not leave a server behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

//! Supervised child processes: the building block of every harness object.
//!
//! A [`Process`] is a real child process with its own [`TestDir`], its
//! stdout and stderr captured to `<dir>/<name>.log`, and a lifetime bound to
//! its handle and to the test process:
//!
//! - it runs in its own process group, and dropping the handle SIGKILLs the
//!   whole group and reaps it, so helpers it forked die with it;
//! - it gets `PR_SET_PDEATHSIG=SIGKILL`, so it also dies when the test
//!   process is killed (a nextest timeout, a Ctrl-C) and no Drop runs. That
//!   signal fires when the *thread* that forked the child exits, not the
//!   process, so every child is forked by one long-lived thread rather
//!   than by whichever test or runtime thread asked (both are
//!   [`bulwark_common::child::spawn_std`], which the daemons' own children
//!   use too);
//! - when the handle drops while the thread is panicking (the test failed),
//!   the log is printed to stderr; `BULWARK_KEEP_TEST_DIRS=1` keeps it and
//!   the rest of the directory on disk.
//!
//! Readiness is explicit: after [`ProcessBuilder::spawn`] a starter waits for
//! what "ready" means for that program (a port accepting, a log line, a file)
//! with a timeout. Every wait notices when the child died instead and fails
//! at once with [`ExitedEarly`], carrying the end of its log.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::TestDir;

/// Env var: print every process log when its handle drops, even in a
/// passing test.
pub const PRINT_LOGS_ENV: &str = "BULWARK_PRINT_LOGS";

/// How much of a log is printed at most when a test fails (its end).
const MAX_PRINTED_LOG: u64 = 256 * 1024;

/// How a [`Process`] is started; kept by the process to restart it with the
/// same program, arguments and environment.
#[derive(Debug, Clone)]
pub struct ProcessBuilder {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    netns: Option<String>,
    stop_timeout: Duration,
}

impl ProcessBuilder {
    /// A process called `name` (used for its directory, log and messages)
    /// running `program`.
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            netns: None,
            stop_timeout: Duration::from_secs(10),
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable (the rest is inherited).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs the program inside the named network namespace
    /// (`/run/netns/<name>`) through `ip netns exec`, which also gives it
    /// that namespace's view of /sys and /etc/netns like a real host.
    /// [`crate::Host::spawn`] sets this.
    pub fn netns(mut self, name: impl Into<String>) -> Self {
        self.netns = Some(name.into());
        self
    }

    /// How long [`Process::stop`] waits after SIGTERM before SIGKILL
    /// (default 10 s).
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// The name given to [`ProcessBuilder::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the process in a fresh temporary directory.
    pub fn spawn(self) -> anyhow::Result<Process> {
        let dir = TestDir::new(&self.name)?;
        self.spawn_in(dir)
    }

    /// Starts the process in `dir`, which the caller made first, typically
    /// to put paths inside it (data dir, config file) into the arguments.
    /// The process owns the directory from now on.
    pub fn spawn_in(self, dir: TestDir) -> anyhow::Result<Process> {
        let log_path = dir.join(format!("{}.log", self.name));
        let mut process = Process {
            spec: self,
            dir,
            log_path,
            child: None,
            last_status: None,
            log_offset: 0,
            starts: 0,
        };
        process.start()?;
        Ok(process)
    }
}

/// A supervised child process; see the [module docs](self).
#[derive(Debug)]
pub struct Process {
    spec: ProcessBuilder,
    // Declared after `child` would matter for drop order if Drop were
    // derived; our Drop kills the child explicitly before the dir goes.
    dir: TestDir,
    log_path: PathBuf,
    child: Option<Child>,
    last_status: Option<ExitStatus>,
    // Where the current run's output starts in the log, so readiness waits
    // after a restart do not match lines of the previous run.
    log_offset: u64,
    starts: u32,
}

/// The process exited while the harness was waiting for it to become ready
/// (or to do something else).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{name} exited ({status}) while waiting for {what}; end of its log {}:\n{tail}",
    log.display()
)]
pub struct ExitedEarly {
    /// The process name.
    pub name: String,
    /// How it ended, e.g. "exit status: 1".
    pub status: String,
    /// What the harness was waiting for.
    pub what: String,
    /// Its log file.
    pub log: PathBuf,
    /// The last lines of its log.
    pub tail: String,
    /// The log says a listen address was already in use: starters that
    /// pre-allocate ports retry with new ones (see [`crate::ports`]).
    pub addr_in_use: bool,
}

impl Process {
    /// The name it was started with.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Its temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its log file (stdout and stderr of every run, restarts marked).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        read_from(&self.log_path, 0)
    }

    /// The log of the current (or last) run only.
    pub fn current_log(&self) -> String {
        read_from(&self.log_path, self.log_offset)
    }

    /// The arguments it runs with.
    pub fn args(&self) -> &[OsString] {
        &self.spec.args
    }

    /// Replaces the value after `flag` (`--flag value`) or of `--flag=value`
    /// for the next start; false if the flag is not there. Used to restart a
    /// server on the port it was given on its first start (`:0` then).
    pub fn set_arg(&mut self, flag: &str, value: impl AsRef<OsStr>) -> bool {
        let value = value.as_ref();
        let prefix = format!("{flag}=");
        for i in 0..self.spec.args.len() {
            if self.spec.args[i] == OsStr::new(flag) && i + 1 < self.spec.args.len() {
                self.spec.args[i + 1] = value.to_owned();
                return true;
            }
            if self.spec.args[i]
                .to_str()
                .is_some_and(|a| a.starts_with(&prefix))
            {
                let mut joined = OsString::from(&prefix);
                joined.push(value);
                self.spec.args[i] = joined;
                return true;
            }
        }
        false
    }

    /// The network namespace it runs in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.spec.netns.as_deref()
    }

    /// Its pid while it runs (or has exited but not been reaped yet).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True until it exits. Does not reap, so the pid stays reserved and
    /// signals to it cannot hit a recycled pid.
    pub fn is_running(&self) -> bool {
        self.child
            .as_ref()
            .is_some_and(|c| peek_exit(c.id()).is_none())
    }

    /// How the last run ended, once the harness has reaped it.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.last_status
    }

    /// Sends a signal to the main process (not its group).
    pub fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.name()))?;
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // unreaped child, so it cannot have been recycled.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sending signal {signal} to {}", self.name()));
        }
        Ok(())
    }

    /// Sends SIGTERM and returns at once (to watch a graceful shutdown).
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// SIGTERM, wait for the exit up to the stop timeout, then SIGKILL.
    /// Returns how it ended; a no-op if it is not running.
    pub async fn stop(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.child.is_none() {
            return Ok(self.last_status);
        }
        if self.is_running() {
            self.terminate()?;
        }
        match self.wait_exit(self.spec.stop_timeout).await {
            Ok(status) => Ok(Some(status)),
            Err(_) => {
                eprintln!(
                    "[bulwark-testkit] {} ignored SIGTERM for {:?}; killing it",
                    self.name(),
                    self.spec.stop_timeout
                );
                self.kill()
            }
        }
    }

    /// SIGKILL to the whole process group, then reap. Returns how it ended;
    /// a no-op if it is not running.
    pub fn kill(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(self.last_status);
        };
        // Group first, while the unreaped leader still holds the pid (and so
        // the group id), then reap.
        kill_group(child.id());
        let status = child
            .wait()
            .with_context(|| format!("reaping {}", self.spec.name))?;
        self.last_status = Some(status);
        Ok(Some(status))
    }

    /// Waits until it exits by itself, up to `timeout`, then reaps it (and
    /// SIGKILLs anything left in its process group).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let Some(pid) = self.pid() else {
            return self
                .last_status
                .with_context(|| format!("{} was never started", self.name()));
        };
        let deadline = Instant::now() + timeout;
        while peek_exit(pid).is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.kill()?
            .with_context(|| format!("{} vanished", self.name()))
    }

    /// Starts it again with the same program, arguments and directory (a
    /// restarted etcd member finds its data). Fails if it is running.
    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.is_running(),
            "{} is already running (pid {:?})",
            self.name(),
            self.pid()
        );
        // Reap a previous run that exited by itself.
        self.kill()?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        if self.starts > 0 {
            writeln!(
                log,
                "\n----- bulwark-testkit: start #{} of {} -----",
                self.starts + 1,
                self.spec.name
            )?;
        }
        self.log_offset = log.metadata()?.len();
        self.starts += 1;
        let child = spawn_supervised(&self.spec, self.dir.path(), log)
            .with_context(|| format!("starting {} ({})", self.name(), self.command_line()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops it (SIGTERM, see [`Process::stop`]) if it runs, then starts it
    /// again. The caller waits for readiness again.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.start()
    }

    /// Polls `check` until it returns `Some`, failing with [`ExitedEarly`]
    /// as soon as the process exits and with a timeout error (with the end
    /// of the log) after `timeout`. The base of every readiness wait.
    pub async fn wait_until<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            // Exit is checked before and after the probe: a port another
            // process holds (the race in `ports`) accepts connections even
            // though ours died of "address in use".
            if let Some(exit) = self.child.as_ref().and_then(|c| peek_exit(c.id())) {
                return Err(self.exited_early(what, exit).into());
            }
            if self.child.is_none() {
                anyhow::bail!("{} is not running (waiting for {what})", self.name());
            }
            if let Some(value) = check().await {
                if let Some(exit) = self.child.as_ref().and_then(|c| peek_exit(c.id())) {
                    return Err(self.exited_early(what, exit).into());
                }
                return Ok(value);
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{} did not show {what} within {timeout:?}; end of its log {}:\n{}",
                    self.name(),
                    self.log_path.display(),
                    tail(&self.current_log(), 40)
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Waits until `addr` accepts TCP connections (from inside the
    /// process's network namespace if it has one).
    pub async fn wait_for_port(&self, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
        let netns = self.spec.netns.clone();
        self.wait_until(&format!("{addr} accepting connections"), timeout, || {
            let netns = netns.clone();
            async move {
                let connect = async {
                    match &netns {
                        Some(ns) => crate::netns::tcp_connect_in(ns, addr).await,
                        None => Ok(tokio::net::TcpStream::connect(addr).await?),
                    }
                };
                match tokio::time::timeout(Duration::from_secs(1), connect).await {
                    Ok(Ok(_)) => Some(()),
                    _ => None,
                }
            }
        })
        .await
    }

    /// Waits until a line of the current run contains `needle`; returns
    /// that line.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        self.wait_until(&format!("{needle:?} in its log"), timeout, || async {
            self.current_log()
                .lines()
                .find(|line| line.contains(needle))
                .map(str::to_owned)
        })
        .await
    }

    /// Waits until `path` exists.
    pub async fn wait_for_file(&self, path: &Path, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(
            &format!("{} to appear", path.display()),
            timeout,
            || async { path.exists().then_some(()) },
        )
        .await
    }

    fn exited_early(&self, what: &str, status: String) -> ExitedEarly {
        let log = self.current_log();
        let lower = log.to_ascii_lowercase();
        ExitedEarly {
            name: self.name().to_owned(),
            status,
            what: what.to_owned(),
            log: self.log_path.clone(),
            tail: tail(&log, 40),
            addr_in_use: lower.contains("address already in use")
                || lower.contains("address in use"),
        }
    }

    fn command_line(&self) -> String {
        let mut line = self.spec.program.display().to_string();
        for arg in &self.spec.args {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let pid = self.pid();
        if let Err(err) = self.kill() {
            eprintln!("[bulwark-testkit] {err:#}");
        }
        if std::thread::panicking() || crate::env_flag(PRINT_LOGS_ENV) {
            print_log(self.name(), pid, &self.log_path);
        }
    }
}

fn print_log(name: &str, pid: Option<u32>, path: &Path) {
    let mut text = String::new();
    let mut skipped = 0;
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len > MAX_PRINTED_LOG {
            skipped = len - MAX_PRINTED_LOG;
            let _ = file.seek(SeekFrom::Start(skipped));
        }
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let pid = pid.map(|p| format!(" pid {p}")).unwrap_or_default();
    let keep = if crate::env_flag(crate::dir::KEEP_DIRS_ENV) {
        String::new()
    } else {
        format!(" (deleted now; {}=1 keeps it)", crate::dir::KEEP_DIRS_ENV)
    };
    let mut out = format!(
        "\n===== log of {name}{pid}: {}{keep} =====\n",
        path.display()
    );
    if skipped > 0 {
        out.push_str(&format!("[... first {skipped} bytes left out ...]\n"));
    }
    out.push_str(&text);
    if !text.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!("===== end of log of {name} =====\n"));
    // One write so logs of processes dropped together do not interleave.
    let _ = std::io::stderr().lock().write_all(out.as_bytes());
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.seek(SeekFrom::Start(offset));
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether `pid` (our child) has exited, without reaping it: `Some(how)`
/// once it has. Not reaping keeps the pid ours, so signalling its group
/// afterwards cannot reach an unrelated process that got the pid.
fn peek_exit(pid: u32) -> Option<String> {
    // SAFETY: an all-zero siginfo_t is a valid value, and waitid only
    // writes into the struct we pass.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        // ECHILD: already reaped (by us, elsewhere): it is not running.
        return Some("already reaped".to_owned());
    }
    // SAFETY: si_pid and si_status are valid to read for SIGCHLD info,
    // which is what waitid fills in.
    let (child, status) = unsafe { (info.si_pid(), info.si_status()) };
    if child == 0 {
        return None;
    }
    Some(match info.si_code {
        libc::CLD_EXITED => format!("exit status: {status}"),
        _ => format!("killed by signal {status}"),
    })
}

fn kill_group(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions. The child leads
    // its own group (process_group(0)), so -pid is that group.
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
    }
}

fn spawn_supervised(spec: &ProcessBuilder, dir: &Path, log: File) -> anyhow::Result<Child> {
    let mut cmd = match &spec.netns {
        Some(ns) => {
            let mut cmd = Command::new(crate::tools::system("ip")?);
            cmd.args(["netns", "exec", ns]).arg(&spec.program);
            cmd
        }
        None => Command::new(&spec.program),
    };
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    // Tied to this process (PR_SET_PDEATHSIG), forked on a thread that
    // lives as long as it does.
    Ok(bulwark_common::child::spawn_std(cmd)?)
}

/// Exit status helper for messages: "exit code 0" or "signal 9".
pub fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

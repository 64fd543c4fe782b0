//! The load driver (`bulwark-bench load`, started by the suite inside the
//! client host's network namespace): many concurrent HTTPS clients through
//! the VIP, recording every outcome with a wall-clock timestamp (the suite
//! lines them up with its fault markers; one machine, one clock).
//!
//! - Watchers, like kubelets and controllers: one HTTP/2 connection each
//!   holding a watch stream (`?watch=true`; the fixture sends an event
//!   every second). A stream that ends, fails or stays silent for
//!   `--watch-idle` is dropped and re-established after a short
//!   per-client backoff. client-go notices a dead connection through
//!   HTTP/2 pings after 30 s read-idle + 15 s; the shorter idle limit keeps
//!   a run short and is the same for every contender.
//! - Requesters: short GETs (a configmap list) at a fixed pace each. Even
//!   ids keep one HTTP/2 connection (controllers), odd ids open a new
//!   connection per request (kubectl), so both failed requests and failed
//!   new connections show.
//! - For the `distribution` scenario, clients behave more like client-go
//!   (all off by default, so the other scenarios keep their load):
//!   `--watcher-rate` makes each watcher send short requests on its
//!   watch's connection, as an informer's client shares one HTTP/2
//!   connection; `--watch-timeout` gives watches a `timeoutSeconds` (the
//!   reflector's jitter, T to 2T) after which they are re-established on
//!   the same connection, not lost; `--follow-goaway` makes every client
//!   open a new connection for its next request once the current one said
//!   GOAWAY, while a watch already on it runs to its end.
//!
//! Starts on `--ready-file` being written (every watcher has its stream),
//! stops on SIGTERM, then writes every event to `--out` as CSV:
//! `kind,client,start_ns,end_ns,ok,detail`. SIGUSR1 drops every client's
//! connection at once (the `storm-reset` scenario): each watch stream is
//! lost there and then, and every client reconnects as after a failure,
//! as if each had learnt of its dead connection at the same instant.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bulwark_testkit::fixture::{HttpsClient, HttpsConnection};
use http_body_util::BodyExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The short request's path.
const LIST_PATH: &str = "/api/v1/namespaces/default/configmaps";
/// The watch's path.
const WATCH_PATH: &str = "/api/v1/namespaces/default/configmaps?watch=true";

/// Flags of `bulwark-bench load`.
#[derive(clap::Args)]
pub struct Args {
    /// VIP:port.
    #[arg(long)]
    target: SocketAddr,
    /// CA certificate (PEM) the apiservers' certificates chain to.
    #[arg(long)]
    ca: PathBuf,
    /// Long-lived watch clients.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Short-request clients.
    #[arg(long, default_value_t = 8)]
    requesters: usize,
    /// Requests per second per requester.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Timeout of the TCP connect and of a short request.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Timeout of the TLS and HTTP/2 handshakes once TCP is connected
    /// (client-go's TLS handshake timeout). A connected handshake that is
    /// slow is queued behind others, not lost: giving up after 1 s and
    /// starting over only multiplies the work, and thousands of clients
    /// doing that at once never get back on a 2-core machine.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// A watch stream silent this long is considered dead.
    #[arg(long, default_value = "2500ms", value_parser = humantime::parse_duration)]
    watch_idle: Duration,
    /// Short requests per second each watcher sends on its watch's
    /// connection (0: none).
    #[arg(long, default_value_t = 0.0)]
    watcher_rate: f64,
    /// Watches ask for `timeoutSeconds` between this and twice this, and
    /// are re-established on the same connection when it passes (absent:
    /// watches run until they fail).
    #[arg(long, value_parser = humantime::parse_duration)]
    watch_timeout: Option<Duration>,
    /// A connection that said GOAWAY (or closed) is replaced before the
    /// next request instead of failing it, as client-go does.
    #[arg(long)]
    follow_goaway: bool,
    /// Written once every watcher has its first stream.
    #[arg(long)]
    ready_file: PathBuf,
    /// The CSV of every event.
    #[arg(long)]
    out: PathBuf,
}

/// One recorded outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A short GET (on a kept or a new connection).
    Request,
    /// A connect: TCP, TLS and HTTP/2 handshakes.
    Connect,
    /// A watch stream established (response headers, status 200).
    WatchUp,
    /// A watch stream lost (`start` = when it came up, `end` = when lost).
    WatchDown,
    /// A watch stream that ended at its `timeoutSeconds` (not lost: it is
    /// re-established at once).
    WatchEnd,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "req",
            Kind::Connect => "conn",
            Kind::WatchUp => "watch_up",
            Kind::WatchDown => "watch_down",
            Kind::WatchEnd => "watch_end",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "req" => Kind::Request,
            "conn" => Kind::Connect,
            "watch_up" => Kind::WatchUp,
            "watch_down" => Kind::WatchDown,
            "watch_end" => Kind::WatchEnd,
            _ => return None,
        })
    }
}

/// One line of the CSV.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: Kind,
    /// Watcher or requester id (requesters after watchers).
    pub client: usize,
    /// Unix time, ns.
    pub start_ns: u64,
    pub end_ns: u64,
    pub ok: bool,
    pub detail: String,
}

/// Unix time in ns.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Reads the CSV `run` writes.
pub fn read_events(path: &std::path::Path) -> anyhow::Result<Vec<Event>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut events = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let mut f = line.splitn(6, ',');
        let mut next = || f.next().with_context(|| format!("line {}: short", n + 1));
        let kind = next()?;
        let kind = Kind::parse(kind).with_context(|| format!("line {}: kind {kind:?}", n + 1))?;
        let client = next()?.parse()?;
        let start_ns = next()?.parse()?;
        let end_ns = next()?.parse()?;
        let ok = next()? == "1";
        let detail = next().unwrap_or_default().to_owned();
        events.push(Event {
            kind,
            client,
            start_ns,
            end_ns,
            ok,
            detail,
        });
    }
    Ok(events)
}

type Log = Vec<Event>;

fn record(log: &mut Log, kind: Kind, client: usize, start_ns: u64, ok: bool, detail: String) {
    log.push(Event {
        kind,
        client,
        start_ns,
        end_ns: now_ns(),
        ok,
        detail,
    });
}

/// The first line of an error, without commas (CSV).
fn short(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .replace([',', '\n'], ";")
        .chars()
        .take(120)
        .collect()
}

/// Connects (TCP within `--timeout`, then TLS and HTTP/2 within
/// `--handshake-timeout`); records the outcome.
async fn connect(
    client: &HttpsClient,
    args: &Args,
    id: usize,
    log: &mut Log,
) -> Option<HttpsConnection> {
    let start = now_ns();
    let target = args.target;
    let tcp = match tokio::time::timeout(args.timeout, tokio::net::TcpStream::connect(target)).await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let e = anyhow::Error::new(e).context(format!("connecting to {target}"));
            record(log, Kind::Connect, id, start, false, short(&e));
            return None;
        }
        Err(_) => {
            let d = format!("connecting to {target}: timed out");
            record(log, Kind::Connect, id, start, false, d);
            return None;
        }
    };
    let name = target.ip().to_string();
    let handshake = client.handshake(tcp, &name);
    match tokio::time::timeout(args.handshake_timeout, handshake).await {
        Ok(Ok(c)) => {
            record(log, Kind::Connect, id, start, true, String::new());
            Some(c)
        }
        Ok(Err(e)) => {
            record(log, Kind::Connect, id, start, false, short(&e));
            None
        }
        Err(_) => {
            record(
                log,
                Kind::Connect,
                id,
                start,
                false,
                "handshake timeout".into(),
            );
            None
        }
    }
}

/// A per-client backoff before reconnecting: 100-300 ms, spread by id so
/// the clients do not reconnect in lockstep.
fn backoff(id: usize) -> Duration {
    Duration::from_millis(100 + (id as u64 * 37) % 200)
}

/// The watch path, with a `timeoutSeconds` between T and 2T when
/// `--watch-timeout` is T (spread by client and round, like client-go's
/// reflector spreads its watches).
fn watch_path(args: &Args, id: usize, round: u64) -> String {
    match args.watch_timeout {
        Some(t) => {
            let t = t.as_secs().max(1);
            let spread = (id as u64)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(round.wrapping_mul(40_503))
                % (t + 1);
            format!("{WATCH_PATH}&timeoutSeconds={}", t + spread)
        }
        None => WATCH_PATH.to_owned(),
    }
}

/// How a watch stream ended.
enum WatchOutcome {
    /// Never came up, or was lost: back off, then a new connection.
    Lost,
    /// Ended at its `timeoutSeconds`: watch again on the current connection.
    TimedOut,
}

/// One watcher's connections: `current` takes new requests; `draining` is
/// the connection that said GOAWAY while the watch ran on it, kept until
/// the watch ends.
#[derive(Default)]
struct WatcherConns {
    current: Option<HttpsConnection>,
    draining: Option<HttpsConnection>,
}

impl WatcherConns {
    /// A connection that takes new requests: the current one unless it
    /// said GOAWAY or closed (then it drains, and a new one is opened).
    async fn usable(
        &mut self,
        client: &HttpsClient,
        args: &Args,
        id: usize,
        log: &mut Log,
    ) -> Option<&mut HttpsConnection> {
        if self
            .current
            .as_ref()
            .is_some_and(HttpsConnection::is_closed)
        {
            let old = self.current.take();
            // Only the watch's own connection needs to stay; one a side
            // request opened later has no stream left on it.
            if self.draining.is_none() {
                self.draining = old;
            }
        }
        if self.current.is_none() {
            self.current = connect(client, args, id, log).await;
        }
        self.current.as_mut()
    }
}

/// One short request on the watcher's connection (`--watcher-rate`).
async fn side_request(
    conns: &mut WatcherConns,
    client: &HttpsClient,
    args: &Args,
    id: usize,
    log: &mut Log,
) {
    let start = now_ns();
    // Twice at most: a request a GOAWAY refused before it was sent goes
    // again on a new connection, as client-go's transport does.
    for _ in 0..2 {
        let Some(c) = conns.usable(client, args, id, log).await else {
            return;
        };
        let (ok, detail) = match tokio::time::timeout(args.timeout, c.get(LIST_PATH)).await {
            Ok(Ok(r)) if r.status.is_success() => (true, String::new()),
            Ok(Ok(r)) => (false, format!("status {}", r.status)),
            Ok(Err(e)) if HttpsConnection::not_sent(&e) && c.is_closed() => continue,
            Ok(Err(e)) => (false, short(&e)),
            Err(_) => (false, "timeout".into()),
        };
        record(log, Kind::Request, id, start, ok, detail);
        return;
    }
    record(log, Kind::Request, id, start, false, "refused twice".into());
}

/// What one watcher keeps between its watches.
struct WatcherState {
    id: usize,
    round: u64,
    conns: WatcherConns,
    log: Log,
    /// Whether its first stream has come up (counted in `ready`).
    counted: bool,
    /// Changes on SIGUSR1: the stream is dropped.
    resets: watch::Receiver<u64>,
}

/// One watch: up on the watcher's connection, then events (and side
/// requests) until it ends.
async fn watch_once(
    w: &mut WatcherState,
    args: &Args,
    client: &HttpsClient,
    ready: &AtomicUsize,
) -> Option<WatchOutcome> {
    let (id, conns, log, resets) = (w.id, &mut w.conns, &mut w.log, &mut w.resets);
    let c = conns.usable(client, args, id, log).await?;
    let start = now_ns();
    let path = watch_path(args, id, w.round);
    let response = match tokio::time::timeout(args.handshake_timeout, c.get_streaming(&path)).await
    {
        Ok(Ok(r)) if r.status().is_success() => r,
        Ok(Ok(r)) => {
            record(
                log,
                Kind::WatchUp,
                id,
                start,
                false,
                format!("status {}", r.status()),
            );
            return None;
        }
        Ok(Err(e)) => {
            record(log, Kind::WatchUp, id, start, false, short(&e));
            return None;
        }
        Err(_) => {
            record(log, Kind::WatchUp, id, start, false, "timeout".into());
            return None;
        }
    };
    record(log, Kind::WatchUp, id, start, true, String::new());
    let up = now_ns();
    if !w.counted {
        w.counted = true;
        ready.fetch_add(1, Ordering::Relaxed);
    }
    let mut body = response.into_body();
    let period = Duration::from_secs_f64(1.0 / args.watcher_rate.max(0.001));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // A slow request delays the next instead of a burst catching up.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resets.borrow_and_update();
    let ended = loop {
        tokio::select! {
            _ = resets.changed() => break Err("reset by the driver".to_owned()),
            frame = tokio::time::timeout(args.watch_idle, body.frame()) => match frame {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => break Err(format!("stream error: {e}")),
                Ok(None) => break Ok(()),
                Err(_) => break Err("silent".to_owned()),
            },
            _ = ticks.tick(), if args.watcher_rate > 0.0 => {
                side_request(conns, client, args, id, log).await;
            }
        }
    };
    conns.draining = None;
    match ended {
        Ok(()) if args.watch_timeout.is_some() => {
            record(log, Kind::WatchEnd, id, up, true, String::new());
            Some(WatchOutcome::TimedOut)
        }
        ended => {
            let why = ended.err().unwrap_or_else(|| "stream ended".to_owned());
            log.push(Event {
                kind: Kind::WatchDown,
                client: id,
                start_ns: up,
                end_ns: now_ns(),
                ok: false,
                detail: why.replace(',', ";"),
            });
            Some(WatchOutcome::Lost)
        }
    }
}

async fn watcher(
    id: usize,
    args: Arc<Args>,
    client: Arc<HttpsClient>,
    ready: Arc<AtomicUsize>,
    resets: watch::Receiver<u64>,
    stop: CancellationToken,
) -> Log {
    let mut w = WatcherState {
        id,
        round: 0,
        conns: WatcherConns::default(),
        log: Log::new(),
        counted: false,
        resets,
    };
    while !stop.is_cancelled() {
        w.round += 1;
        let outcome = tokio::select! {
            o = watch_once(&mut w, &args, &client, &ready) => o,
            () = stop.cancelled() => break,
        };
        if matches!(outcome, Some(WatchOutcome::TimedOut)) {
            continue;
        }
        // Lost, or never up: a new connection after a short backoff.
        w.conns = WatcherConns::default();
        tokio::select! {
            () = tokio::time::sleep(backoff(id)) => {}
            () = stop.cancelled() => break,
        }
    }
    w.log
}

async fn requester(
    id: usize,
    keep: bool,
    args: Arc<Args>,
    client: Arc<HttpsClient>,
    mut resets: watch::Receiver<u64>,
    stop: CancellationToken,
) -> Log {
    let mut log = Log::new();
    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.01));
    let mut conn: Option<HttpsConnection> = None;
    let mut next = tokio::time::Instant::now() + period.mul_f64((id % 16) as f64 / 16.0);
    while !stop.is_cancelled() {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = stop.cancelled() => break,
        }
        // Paced, not bursting: a late request pushes the schedule back.
        next = (next + period).max(tokio::time::Instant::now());
        if resets.has_changed().unwrap_or(false) {
            resets.borrow_and_update();
            conn = None;
        }
        let work = async {
            if args.follow_goaway && conn.as_ref().is_some_and(HttpsConnection::is_closed) {
                conn = None;
            }
            if conn.is_none() {
                conn = connect(&client, &args, id, &mut log).await;
            }
            let Some(c) = conn.as_mut() else {
                return;
            };
            let start = now_ns();
            let mut result = tokio::time::timeout(args.timeout, c.get(LIST_PATH)).await;
            // Refused by a GOAWAY before it was sent: again on a new
            // connection, as client-go does.
            if args.follow_goaway
                && matches!(&result, Ok(Err(e)) if HttpsConnection::not_sent(e) && c.is_closed())
            {
                conn = connect(&client, &args, id, &mut log).await;
                let Some(c) = conn.as_mut() else {
                    return;
                };
                result = tokio::time::timeout(args.timeout, c.get(LIST_PATH)).await;
            }
            match result {
                Ok(Ok(r)) if r.status.is_success() => {
                    record(&mut log, Kind::Request, id, start, true, String::new());
                }
                Ok(Ok(r)) => {
                    let d = format!("status {}", r.status);
                    record(&mut log, Kind::Request, id, start, false, d);
                    conn = None;
                }
                Ok(Err(e)) => {
                    record(&mut log, Kind::Request, id, start, false, short(&e));
                    conn = None;
                }
                Err(_) => {
                    record(&mut log, Kind::Request, id, start, false, "timeout".into());
                    conn = None;
                }
            }
            if !keep {
                conn = None;
            }
        };
        tokio::select! {
            () = work => {}
            () = stop.cancelled() => break,
        }
    }
    log
}

/// Runs the driver until SIGTERM.
pub fn run(args: Args) -> anyhow::Result<()> {
    // The suite raised it already (this process inherits it); run alone,
    // the driver raises its own.
    let nofile = super::raise_nofile()?;
    anyhow::ensure!(
        nofile > (args.watchers + args.requesters) as u64 + 64,
        "the descriptor limit is {nofile}: too low for {} watchers",
        args.watchers
    );
    crate::runtime::two_workers()?.block_on(run_async(args))
}

async fn run_async(args: Args) -> anyhow::Result<()> {
    let client = Arc::new(
        HttpsClient::from_ca_file(&args.ca)?
            .http2_only()
            .timeout(args.handshake_timeout),
    );
    let args = Arc::new(args);
    let stop = CancellationToken::new();
    let ready = Arc::new(AtomicUsize::new(0));
    let (reset, resets) = watch::channel(0u64);
    let mut tasks = Vec::new();
    for id in 0..args.watchers {
        tasks.push(tokio::spawn(watcher(
            id,
            args.clone(),
            client.clone(),
            ready.clone(),
            resets.clone(),
            stop.clone(),
        )));
        // Ramp up instead of one SYN flood: the storm comes later, on purpose.
        if id % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for j in 0..args.requesters {
        let id = args.watchers + j;
        tasks.push(tokio::spawn(requester(
            id,
            j % 2 == 0,
            args.clone(),
            client.clone(),
            resets.clone(),
            stop.clone(),
        )));
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut announced = false;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = usr1.recv() => {
                reset.send_modify(|n| *n += 1);
                continue;
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if !announced && ready.load(Ordering::Relaxed) >= args.watchers {
            std::fs::write(&args.ready_file, "ready\n")?;
            announced = true;
        }
    }
    stop.cancel();
    let mut csv = String::from("kind,client,start_ns,end_ns,ok,detail\n");
    for t in tasks {
        for e in t.await? {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{}",
                e.kind.as_str(),
                e.client,
                e.start_ns,
                e.end_ns,
                u8::from(e.ok),
                e.detail
            );
        }
    }
    std::fs::write(&args.out, csv).with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_the_csv() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e.csv");
        std::fs::write(
            &path,
            "kind,client,start_ns,end_ns,ok,detail\nreq,3,10,20,1,\nconn,4,30,40,0,refused; really\n",
        )
        .expect("write");
        let e = read_events(&path).expect("parse");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].kind, Kind::Request);
        assert!(e[0].ok);
        assert_eq!((e[1].client, e[1].start_ns, e[1].end_ns), (4, 30, 40));
        assert_eq!(e[1].detail, "refused; really");
        assert!(!e[1].ok);
    }

    #[test]
    fn bad_csv_lines_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e.csv");
        std::fs::write(&path, "header\nnope,1,2,3,1,\n").expect("write");
        assert!(read_events(&path).is_err());
    }
}

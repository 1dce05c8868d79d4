//! kiln's core benchmarks: self-timed (no criterion), in-process, on the release profile.
//!
//! `cargo bench --bench core -- --json PATH [--quick]`
//!
//! Every measurement checks its result first (granted/denied as expected, every message
//! released), then times several runs of a loop over `std::hint::black_box`ed inputs and
//! reports the median (min and max too): the machine is shared and noisy. Allocations are
//! counted with `allocation-counter` (this binary's global allocator) over the timed runs.
//! A naive fixed-window limiter on a std `HashMap<(String, String), _>` runs in the same
//! process as a baseline, so ratios survive a noisy day. `benches/compare.py` reads the JSON.

use std::collections::HashMap as StdHashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use _core::limiter::Limiter;
use _core::{Decision, Engine, Reason};
use allocation_counter::{measure, AllocationInfo};

/// Any `now_ms` in 2025; the engine never reads a clock.
const T0_MS: u64 = 1_750_000_000_000;
const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;
/// The realistic key space: 62,500 IPs x 16 providers = 1,000,000 keys.
const IPS: usize = 62_500;
const PROVIDERS: [&str; 16] = [
    "gmail.com",
    "outlook.com",
    "yahoo.com",
    "icloud.com",
    "aol.com",
    "gmx.net",
    "web.de",
    "comcast.net",
    "orange.fr",
    "mail.ru",
    "yandex.ru",
    "qq.com",
    "naver.com",
    "t-online.de",
    "libero.it",
    "proton.me",
];
const KEYS: usize = IPS * PROVIDERS.len();
/// "Every call is granted": 1e9 per second with the largest burst (same shape as the Python
/// benches). At a fixed `now_ms` that admits 4.29e9 decisions, more than any run makes.
const GENEROUS: (Option<(u64, u64)>, u32) = (Some((1_000_000_000, 1_000)), u32::MAX);

// ----- plumbing: arguments, timing, JSON -----

struct Config {
    json: Option<PathBuf>,
    /// Scale for operation counts (1 normally, smaller with `--quick` for a smoke test).
    div: u64,
    runs: usize,
    /// Run only the groups whose name contains this (`hot`, `million`, `scheduler`).
    only: Option<String>,
}

impl Config {
    fn from_args() -> Result<Self, String> {
        let mut c = Config {
            json: None,
            div: 1,
            runs: 7,
            only: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--json" => c.json = Some(resolve(args.next().ok_or("--json needs a path")?)),
                "--only" => c.only = Some(args.next().ok_or("--only needs a group")?),
                "--quick" => {
                    c.div = 20;
                    c.runs = 3;
                }
                // cargo bench appends `--bench` for harness = false targets.
                "--bench" => {}
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(c)
    }

    fn wants(&self, group: &str) -> bool {
        self.only.as_deref().is_none_or(|o| group.contains(o))
    }

    fn ops(&self, n: u64) -> u64 {
        (n / self.div).max(1)
    }
}

/// cargo runs a bench in its package directory (rust/); a relative `--json` path means the
/// directory the command was started from, which the shell leaves in `PWD`.
fn resolve(path: String) -> PathBuf {
    let path = PathBuf::from(path);
    match std::env::var_os("PWD") {
        Some(pwd) if path.is_relative() => Path::new(&pwd).join(path),
        _ => path,
    }
}

/// Median, min and max of per-operation times over the timed runs.
#[derive(Clone, Copy)]
struct Timing {
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
    runs: usize,
}

/// Run `run(i)` once to warm up, then `runs` times; each call times its own timed part
/// (so it can set up untimed first) and returns it. Also counts allocations made by the
/// timed runs (setup included: benches keep setup allocation-free where that matters).
fn timed(
    runs: usize,
    ops: u64,
    mut run: impl FnMut(usize) -> Duration,
) -> (Timing, AllocationInfo) {
    run(0);
    let mut samples: Vec<f64> = Vec::with_capacity(runs);
    let info = measure(|| {
        for i in 1..=runs {
            let d = run(i);
            samples.push(d.as_nanos() as f64 / ops as f64);
        }
    });
    samples.sort_by(f64::total_cmp);
    let t = Timing {
        median_ns: samples[samples.len() / 2],
        min_ns: samples[0],
        max_ns: samples[samples.len() - 1],
        runs,
    };
    (t, info)
}

enum Json {
    Num(f64),
    Int(u64),
    Str(String),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn write(&self, out: &mut String, indent: usize) {
        match self {
            Json::Num(x) if x.is_finite() => {
                let _ = write!(out, "{x:.3}");
            }
            Json::Num(_) => out.push_str("null"),
            Json::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Str(s) => {
                out.push('"');
                for ch in s.chars() {
                    match ch {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    out.push_str(&"  ".repeat(indent + 1));
                    Json::Str(k.clone()).write(out, indent + 1);
                    out.push_str(": ");
                    v.write(out, indent + 1);
                }
                out.push('\n');
                out.push_str(&"  ".repeat(indent));
                out.push('}');
            }
        }
    }
}

/// One named result: the JSON fields plus one line of the printed table.
struct Row {
    name: &'static str,
    what: String,
    shown: String,
    fields: Vec<(String, Json)>,
}

impl Row {
    fn timing(name: &'static str, what: impl Into<String>, ops: u64, t: Timing) -> Self {
        Row {
            name,
            what: what.into(),
            shown: format!(
                "{:>9.2} ns/op  (min {:.2}, max {:.2})",
                t.median_ns, t.min_ns, t.max_ns
            ),
            fields: vec![
                ("ns_per_op".into(), Json::Num(t.median_ns)),
                ("min_ns_per_op".into(), Json::Num(t.min_ns)),
                ("max_ns_per_op".into(), Json::Num(t.max_ns)),
                ("ops".into(), Json::Int(ops)),
                ("runs".into(), Json::Int(t.runs as u64)),
            ],
        }
    }

    fn with(mut self, key: &str, value: Json) -> Self {
        self.fields.push((key.into(), value));
        self
    }

    fn allocations(self, info: AllocationInfo) -> Self {
        let shown = format!("{}  allocs {}", self.shown, info.count_total);
        let mut r = self
            .with("allocations", Json::Int(info.count_total))
            .with("allocated_bytes", Json::Int(info.bytes_total));
        r.shown = shown;
        r
    }
}

/// SplitMix64: a fixed, reproducible key order without a rand dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is far below noise).
    fn below(&mut self, n: usize) -> u32 {
        ((u128::from(self.next() >> 32) * n as u128) >> 32) as u32
    }
}

fn ip_text(i: usize) -> String {
    format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff)
}

fn assert_granted(d: &Decision) {
    assert!(d.granted > 0, "expected a grant, got {d:?}");
}

// ----- (1) one hot key -----

fn hot_engine(rate: Option<(u64, u64)>, burst: u32, caps: Option<(u64, u64)>) -> (Engine, u32) {
    let mut e = Engine::new();
    let k = e.limiter.key("192.0.2.1", "gmail.com").unwrap();
    let (hourly, daily) = caps.unzip();
    e.set_limits(k, rate, burst, hourly, daily).unwrap();
    (e, k)
}

/// `ops` decisions for one key, consumed as a caller would (granted count and reason read).
fn hot_loop(e: &mut Engine, k: u32, now_ms: u64, ops: u64) -> Duration {
    let t = Instant::now();
    let mut granted = 0u64;
    for _ in 0..ops {
        match e.acquire(black_box(k), black_box(1), black_box(now_ms)) {
            Ok(d) => granted += u64::from(d.granted) + u64::from(d.reason as u8),
            Err(_) => unreachable!("valid arguments"),
        }
    }
    black_box(granted);
    t.elapsed()
}

fn bench_hot_key(c: &Config) -> Vec<Row> {
    let ops = c.ops(20_000_000);
    let mut rows = Vec::new();

    // Granted, rate only (the GCRA fast path).
    let (mut e, k) = hot_engine(GENEROUS.0, GENEROUS.1, None);
    assert_granted(&e.acquire(k, 1, T0_MS).unwrap());
    let (t, info) = timed(c.runs, ops, |_| hot_loop(&mut e, k, T0_MS, ops));
    let charged = e.usage(k).unwrap().day_used;
    assert_eq!(
        u64::from(charged),
        1 + ops * (c.runs as u64 + 1),
        "every decision granted"
    );
    rows.push(
        Row::timing("hot_key_acquire", "hot key, granted (rate)", ops, t)
            .allocations(info)
            .with("granted_fraction", Json::Num(1.0)),
    );

    // Granted with a realistic profile: rate and caps (the slower, capped path).
    let caps = (u64::from(u32::MAX - 1), u64::from(u32::MAX - 1));
    let (mut e, k) = hot_engine(GENEROUS.0, GENEROUS.1, Some(caps));
    e.set_calendar(&[T0_MS + HOUR_MS], &[T0_MS + DAY_MS])
        .unwrap();
    assert_granted(&e.acquire(k, 1, T0_MS).unwrap());
    let (t, info) = timed(c.runs, ops, |_| hot_loop(&mut e, k, T0_MS, ops));
    assert_eq!(
        u64::from(e.usage(k).unwrap().hour_used),
        1 + ops * (c.runs as u64 + 1)
    );
    rows.push(
        Row::timing(
            "hot_key_acquire_capped",
            "hot key, granted (rate+hourly+daily caps)",
            ops,
            t,
        )
        .allocations(info),
    );

    // The same with reservations on: a committed block larger than every run together.
    let (mut e, k) = hot_engine(GENEROUS.0, GENEROUS.1, Some(caps));
    e.set_calendar(&[T0_MS + HOUR_MS], &[T0_MS + DAY_MS])
        .unwrap();
    let (_, token) = e.reservation_snapshot(T0_MS, HOUR_MS, 0).unwrap();
    assert!(e.commit_reservation(token, 1_000));
    let left = e.usage(k).unwrap().reserve_left.expect("reserved");
    assert!(u64::from(left) > 1 + ops * (c.runs as u64 + 1));
    assert_granted(&e.acquire(k, 1, T0_MS).unwrap());
    let (t, info) = timed(c.runs, ops, |_| hot_loop(&mut e, k, T0_MS, ops));
    assert_eq!(
        e.usage(k).unwrap().reserve_left,
        Some(left - 1 - (ops * (c.runs as u64 + 1)) as u32),
        "every decision granted and counted down"
    );
    rows.push(
        Row::timing(
            "hot_key_acquire_reserved",
            "hot key, granted (rate+caps, reservation committed)",
            ops,
            t,
        )
        .allocations(info),
    );

    // Denied: 1 per hour, asked again and again at the same instant.
    let (mut e, k) = hot_engine(Some((1, HOUR_MS)), 1, None);
    assert_granted(&e.acquire(k, 1, T0_MS).unwrap());
    let d = e.acquire(k, 1, T0_MS).unwrap();
    assert_eq!((d.reason, d.retry_after_ms), (Reason::Rate, Some(HOUR_MS)));
    let (t, info) = timed(c.runs, ops, |_| hot_loop(&mut e, k, T0_MS, ops));
    assert_eq!(
        e.usage(k).unwrap().day_used,
        1,
        "every later decision denied"
    );
    rows.push(
        Row::timing("hot_key_denied", "hot key, denied (rate)", ops, t)
            .allocations(info)
            .with("granted_fraction", Json::Num(0.0)),
    );
    rows
}

// ----- (2) + (3) one million keys: time in random order, memory all-in -----

/// The engine a daemon holds for 62,500 IPs x 16 providers, each key with a schedule step's
/// limits: rate, burst, hourly and daily caps (4 warm-up steps x 16 providers = 64 profiles),
/// and a daily cap per IP. The calendar supplies the coming hour boundaries.
fn build_million(ips: &[String], runs: usize) -> Engine {
    let mut e = Engine::new();
    for (i, ip) in ips.iter().enumerate() {
        let step = (i % 4) as u64 + 1;
        for (p, provider) in PROVIDERS.iter().enumerate() {
            let k = e.limiter.key(ip, provider).unwrap();
            let per_hour = 250 * step + 10 * p as u64;
            e.set_limits(
                k,
                Some((per_hour, HOUR_MS)),
                10,
                Some(per_hour),
                Some(per_hour * 10),
            )
            .unwrap();
        }
        e.set_ip_caps(ip, None, Some(100_000)).unwrap();
    }
    let hours: Vec<u64> = (1..=2 * runs as u64 + 4)
        .map(|h| T0_MS + h * HOUR_MS)
        .collect();
    e.set_calendar(&hours, &[T0_MS + DAY_MS]).unwrap();
    e
}

fn bench_million(c: &Config) -> Vec<Row> {
    let ips: Vec<String> = (0..IPS).map(ip_text).collect();
    let runs = c.runs;
    let mut built = None;
    let mem = measure(|| built = Some(build_million(&ips, runs)));
    let mut e = built.expect("built");
    assert_eq!(e.limiter.key_count(), KEYS);
    let key_state = key_state_bytes();
    let per_key = mem.bytes_current as f64 / KEYS as f64;
    // The part of it that is IP interning (address strings, their index, per-IP counters).
    let mut ip_only = Limiter::new();
    let ip_mem = measure(|| {
        for ip in &ips {
            ip_only.ip(ip).unwrap();
        }
    });
    let ip_per_key = ip_mem.bytes_current as f64 / KEYS as f64;
    let mut rows = vec![Row {
        name: "memory_1m_keys",
        what: "1M keys with limits, bytes/key all-in".into(),
        shown: format!(
            "{per_key:>9.2} B/key  (keys {:.2} + IPs {ip_per_key:.2}; state {key_state} B, \
             counters+tat {} B)",
            per_key - ip_per_key,
            counters_bytes(),
        ),
        fields: vec![
            ("bytes_per_key".into(), Json::Num(per_key)),
            ("bytes_total".into(), Json::Int(mem.bytes_current as u64)),
            ("peak_bytes".into(), Json::Int(mem.bytes_max)),
            (
                "live_allocations".into(),
                Json::Int(mem.count_current as u64),
            ),
            ("keys".into(), Json::Int(KEYS as u64)),
            ("key_state_bytes".into(), Json::Int(key_state)),
            ("ip_tables_bytes_per_key".into(), Json::Num(ip_per_key)),
            (
                "key_tables_bytes_per_key".into(),
                Json::Num(per_key - ip_per_key),
            ),
            ("counters_tat_bytes".into(), Json::Int(counters_bytes())),
        ],
    }];

    // Uniform random order over all keys, precomputed. Each run is a fresh calendar hour
    // (rolled untimed first) and time moves on 1 ms per two decisions, so the runs make the
    // same decisions: nearly all granted (a key is asked ~4 times in half an hour).
    let ops = c.ops(4_000_000);
    assert!(ops / 2 < HOUR_MS, "a run stays inside its calendar hour");
    let mut rng = SplitMix(0x6b69_6c6e);
    let order: Vec<u32> = (0..ops).map(|_| rng.below(KEYS)).collect();
    let mut granted = 0u64;
    let (t, info) = timed(runs, ops, |i| {
        let start = T0_MS + (i as u64 + 1) * HOUR_MS;
        e.acquire(order[0], 1, start).unwrap();
        let t = Instant::now();
        for (j, &k) in order.iter().enumerate() {
            if let Ok(d) = e.acquire(black_box(k), 1, start + (j as u64 >> 1)) {
                granted += u64::from(d.granted);
            }
        }
        t.elapsed()
    });
    let granted_fraction = granted as f64 / (ops * (runs as u64 + 1)) as f64;
    assert!(granted_fraction > 0.99, "granted {granted_fraction}");
    rows.push(
        Row::timing("uniform_1m_keys", "1M keys, uniform random order", ops, t)
            .allocations(info)
            .with("keys", Json::Int(KEYS as u64))
            .with("granted_fraction", Json::Num(granted_fraction)),
    );
    rows.push(bench_batch_random(c, &mut e, &order));
    rows.extend(bench_batch(c, &mut e));
    rows.extend(bench_baseline(c, &ips, &order));
    rows
}

/// The same random order, decided 1024 at a time with `acquire_batch` (what a daemon does
/// with a buffer of requests): the batch API's chance to overlap the cache misses.
fn bench_batch_random(c: &Config, e: &mut Engine, order: &[u32]) -> Row {
    const SIZE: usize = 1024;
    let ops = (order.len() - order.len() % SIZE) as u64;
    let mut out: Vec<Decision> = Vec::with_capacity(SIZE);
    let mut granted = 0u64;
    let (t, info) = timed(c.runs, ops, |i| {
        // Later hours than the single-call runs, so the keys have room again.
        let start = T0_MS + (c.runs + 2 + i) as u64 * HOUR_MS;
        e.acquire(order[0], 1, start).unwrap();
        let t = Instant::now();
        for (j, chunk) in order.chunks_exact(SIZE).enumerate() {
            out.clear();
            let reqs = black_box(chunk).iter().map(|&k| (k, 1));
            e.limiter
                .acquire_batch(reqs, start + j as u64, &mut out)
                .unwrap();
            granted += out.iter().map(|d| u64::from(d.granted)).sum::<u64>();
        }
        t.elapsed()
    });
    let granted_fraction = granted as f64 / (ops * (c.runs as u64 + 1)) as f64;
    assert!(granted_fraction > 0.99, "granted {granted_fraction}");
    Row::timing(
        "batch_1024_random_1m",
        "1M keys, uniform random, acquire_batch of 1024",
        ops,
        t,
    )
    .allocations(info)
    .with("granted_fraction", Json::Num(granted_fraction))
}

/// Bytes of per-key state, measured: `Limiter` clones allocate each `Vec` at its exact length
/// and each hash table at its source's bucket count, so two limiters that differ only by
/// `EXTRA` keys (same IPs, providers and table size) clone `EXTRA * size_of::<KeySlot>()`
/// bytes apart. (`KeySlot` is crate-private; see limiter/tests.rs `key_slot_is_32_bytes`.)
fn key_state_bytes() -> u64 {
    const BASE: usize = 512;
    const EXTRA: usize = 256;
    let mut l = Limiter::new();
    let ips: Vec<u32> = (0..64).map(|i| l.ip(&ip_text(i)).unwrap()).collect();
    let provs: Vec<u16> = PROVIDERS.iter().map(|p| l.provider(p).unwrap()).collect();
    let mut pairs = ips.iter().flat_map(|&i| provs.iter().map(move |&p| (i, p)));
    let clone_bytes = |l: &Limiter| measure(|| drop(black_box(l.clone()))).bytes_total;
    for (ip, p) in pairs.by_ref().take(BASE) {
        l.key_of(ip, p).unwrap();
    }
    let before = clone_bytes(&l);
    for (ip, p) in pairs.take(EXTRA) {
        l.key_of(ip, p).unwrap();
    }
    let after = clone_bytes(&l);
    assert_eq!(
        (after - before) % EXTRA as u64,
        0,
        "tables must not have grown"
    );
    (after - before) / EXTRA as u64
}

/// `tat_ns` (u64) + `hour_used` + `day_used` (u32 each): the part of a key's state that changes
/// on every grant. The rest of the slot says which IP, provider and profile.
fn counters_bytes() -> u64 {
    (std::mem::size_of::<u64>() + 2 * std::mem::size_of::<u32>()) as u64
}

// ----- batch: the in-process figure Python's acquire_batch is held against -----

fn bench_batch(c: &Config, e: &mut Engine) -> Vec<Row> {
    let mut rows = Vec::new();
    for (size, name) in [(64usize, "batch_64"), (1024, "batch_1024")] {
        // Distinct keys, generous limits: the batch the Python bench sends.
        let mut keys = Vec::with_capacity(size);
        for i in 0..size {
            let k = e
                .limiter
                .key(&format!("192.0.2.{}", i / 16), PROVIDERS[i % 16]);
            let k = k.unwrap();
            e.set_limits(k, GENEROUS.0, GENEROUS.1, None, None).unwrap();
            keys.push(k);
        }
        let batches = c.ops(20_000_000) / size as u64;
        let ops = batches * size as u64;
        let mut out: Vec<Decision> = Vec::with_capacity(size);
        let (t, info) = timed(c.runs, ops, |_| {
            let t = Instant::now();
            for _ in 0..batches {
                out.clear();
                let reqs = black_box(&keys).iter().map(|&k| (k, 1));
                e.limiter.acquire_batch(reqs, T0_MS, &mut out).unwrap();
                black_box(&out);
            }
            t.elapsed()
        });
        assert_eq!(out.len(), size);
        assert!(out.iter().all(|d| d.granted == 1), "every decision granted");
        rows.push(
            Row::timing(
                name,
                format!("acquire_batch of {size}, per decision"),
                ops,
                t,
            )
            .allocations(info)
            .with("batch", Json::Int(size as u64)),
        );
    }
    rows
}

// ----- (5) baseline: what a quick hand-rolled limiter costs -----

/// A naive fixed-window limiter: std `HashMap` (SipHash) keyed by (ip, provider) strings,
/// value (window start ms, used, limit). Lookup and update per decision.
struct Naive {
    map: StdHashMap<(String, String), (u64, u32, u32)>,
}

impl Naive {
    const WINDOW_MS: u64 = HOUR_MS;

    fn acquire(&mut self, key: &(String, String), n: u32, now_ms: u64) -> bool {
        let Some((start, used, limit)) = self.map.get_mut(key) else {
            return false;
        };
        if now_ms - *start >= Self::WINDOW_MS {
            *start = now_ms - now_ms % Self::WINDOW_MS;
            *used = 0;
        }
        if *used + n <= *limit {
            *used += n;
            true
        } else {
            false
        }
    }
}

fn bench_baseline(c: &Config, ips: &[String], order: &[u32]) -> Vec<Row> {
    let ops_hot = c.ops(20_000_000);
    let keys: Vec<(String, String)> = ips
        .iter()
        .flat_map(|ip| PROVIDERS.iter().map(move |p| (ip.clone(), (*p).to_owned())))
        .collect();
    let mut naive = Naive {
        map: StdHashMap::new(),
    };
    let mem = measure(|| {
        for k in &keys {
            naive.map.insert(k.clone(), (T0_MS, 0, u32::MAX - 1));
        }
    });
    let hot = &keys[0];
    assert!(naive.acquire(hot, 1, T0_MS));
    let (t_hot, info) = timed(c.runs, ops_hot, |_| {
        let t = Instant::now();
        for _ in 0..ops_hot {
            black_box(naive.acquire(black_box(hot), 1, black_box(T0_MS)));
        }
        t.elapsed()
    });
    let ops = order.len() as u64;
    let mut granted = 0u64;
    let (t_many, info_many) = timed(c.runs, ops, |_| {
        let t = Instant::now();
        for &k in order {
            granted += u64::from(naive.acquire(black_box(&keys[k as usize]), 1, T0_MS));
        }
        t.elapsed()
    });
    assert_eq!(granted, ops * (c.runs as u64 + 1));
    let per_key = mem.bytes_current as f64 / KEYS as f64;
    let base = "naive HashMap<(String,String),_>";
    vec![
        Row::timing(
            "baseline_hot_key",
            format!("{base}, hot key"),
            ops_hot,
            t_hot,
        )
        .allocations(info),
        Row::timing(
            "baseline_1m_keys",
            format!("{base}, 1M keys uniform"),
            ops,
            t_many,
        )
        .allocations(info_many),
        Row {
            name: "baseline_memory_1m_keys",
            what: format!("{base}, bytes/key"),
            shown: format!("{per_key:>9.2} B/key"),
            fields: vec![
                ("bytes_per_key".into(), Json::Num(per_key)),
                ("bytes_total".into(), Json::Int(mem.bytes_current as u64)),
            ],
        },
    ]
}

// ----- (4) the release queue -----

/// Two pools of 4 IPs, 4 providers: 8 (pool, provider) queues over 32 keys.
fn scheduler_engine(rate: Option<(u64, u64)>) -> (Engine, Vec<(u32, u16)>) {
    let mut e = Engine::new();
    let mut queues = Vec::new();
    for (p, name) in ["warm-a", "warm-b"].into_iter().enumerate() {
        let ips: Vec<String> = (0..4).map(|i| format!("198.51.{p}.{i}")).collect();
        let members: Vec<(&str, u32, bool)> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (ip.as_str(), 1, i == 0))
            .collect();
        let pool = e.define_pool(name, &members, None).unwrap();
        for provider in &PROVIDERS[..4] {
            let prov = e.limiter.provider(provider).unwrap();
            for ip in &ips {
                let k = e.limiter.key(ip, provider).unwrap();
                e.set_limits(k, rate, 1, None, None).unwrap();
            }
            queues.push((pool, prov));
        }
    }
    (e, queues)
}

fn enqueue_all(e: &mut Engine, queues: &[(u32, u16)], messages: u64) {
    let q = queues.len() as u64;
    for id in 0..messages {
        let (pool, provider) = queues[(id % q) as usize];
        let priority = i32::from(id % 10 == 0);
        e.enqueue(black_box(id), pool, provider, priority, 1)
            .unwrap();
    }
}

fn bench_scheduler(c: &Config) -> Vec<Row> {
    let messages = c.ops(1_000_000);
    let chunk = 1024;
    let mut rows = Vec::new();

    // Unlimited keys: every pick grants; enqueue all, then `due` them out in chunks.
    let (mut e, queues) = scheduler_engine(None);
    let (mut enq, mut rel) = (Vec::new(), Vec::new());
    let mut out = Vec::with_capacity(chunk);
    let mut first_ids = Vec::new();
    let (t, info) = timed(c.runs.min(5), messages, |_| {
        let t = Instant::now();
        enqueue_all(&mut e, &queues, messages);
        let t_enq = t.elapsed();
        first_ids.clear();
        while e.queued() > 0 {
            out.clear();
            e.due(T0_MS, chunk, &mut out).unwrap();
            if first_ids.is_empty() {
                first_ids.extend(out.iter().take(3).map(|m| m.0));
            }
        }
        let total = t.elapsed();
        enq.push(t_enq.as_nanos() as f64 / messages as f64);
        rel.push(total.saturating_sub(t_enq).as_nanos() as f64 / messages as f64);
        total
    });
    // Priority 1 (every tenth id) goes first, oldest first.
    assert_eq!(first_ids, [0, 10, 20]);
    assert_eq!(e.next_due_ms(T0_MS), None);
    rows.push(
        Row::timing(
            "scheduler_1m",
            "scheduler 1M queued, enqueue+due",
            messages,
            t,
        )
        .allocations(info)
        .with("enqueue_ns", Json::Num(median(&mut enq)))
        .with("due_ns", Json::Num(median(&mut rel)))
        .with("queues", Json::Int(queues.len() as u64)),
    );

    // Rate-limited keys (1 per ms each, burst 1): each `due` releases one message per key,
    // then the queue's head is denied and the queue is set aside until the next ms.
    let (mut e, queues) = scheduler_engine(Some((1_000, 1_000)));
    let mut steps = 0u64;
    let (t, info) = timed(c.runs.min(3), messages, |i| {
        let t = Instant::now();
        enqueue_all(&mut e, &queues, messages);
        let mut now = T0_MS + i as u64 * DAY_MS;
        steps = 0;
        while e.queued() > 0 {
            out.clear();
            e.due(now, chunk, &mut out).unwrap();
            assert!(out.len() <= 32, "at most one per key per ms");
            steps += 1;
            if e.queued() > 0 {
                now = e.next_due_ms(now).expect("a queue waits");
                assert_eq!(now, T0_MS + i as u64 * DAY_MS + steps, "blocked for 1 ms");
            }
        }
        t.elapsed()
    });
    assert_eq!(
        steps,
        messages.div_ceil(32),
        "32 keys release one each per ms"
    );
    rows.push(
        Row::timing(
            "scheduler_1m_rate_limited",
            "scheduler 1M queued, rate-limited keys (block/unblock)",
            messages,
            t,
        )
        .allocations(info)
        .with("due_calls", Json::Int(steps)),
    );
    rows
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

// ----- report -----

fn field(rows: &[Row], name: &str, key: &str) -> f64 {
    rows.iter()
        .find(|r| r.name == name)
        .and_then(|r| r.fields.iter().find(|(k, _)| k == key))
        .map_or(f64::NAN, |(_, v)| match v {
            Json::Num(x) => *x,
            Json::Int(n) => *n as f64,
            _ => f64::NAN,
        })
}

fn ratios(rows: &[Row]) -> Json {
    let ns = |name| field(rows, name, "ns_per_op");
    let bytes = |name| field(rows, name, "bytes_per_key");
    Json::Obj(vec![
        (
            "baseline_over_kiln_hot_key".into(),
            Json::Num(ns("baseline_hot_key") / ns("hot_key_acquire")),
        ),
        (
            "baseline_over_kiln_1m_keys".into(),
            Json::Num(ns("baseline_1m_keys") / ns("uniform_1m_keys")),
        ),
        (
            "baseline_over_kiln_memory".into(),
            Json::Num(bytes("baseline_memory_1m_keys") / bytes("memory_1m_keys")),
        ),
        (
            "uniform_1m_over_hot_key".into(),
            Json::Num(ns("uniform_1m_keys") / ns("hot_key_acquire")),
        ),
        (
            "batch_64_over_hot_key".into(),
            Json::Num(ns("batch_64") / ns("hot_key_acquire")),
        ),
    ])
}

fn main() {
    let c = match Config::from_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("core bench: {e}\nusage: core [--json PATH] [--quick] [--only GROUP]");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    if c.wants("hot") {
        rows.extend(bench_hot_key(&c));
    }
    if c.wants("million") {
        rows.extend(bench_million(&c));
    }
    if c.wants("scheduler") {
        rows.extend(bench_scheduler(&c));
    }

    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "\n{:<28} {:<52} result", "name", "what");
    for r in &rows {
        let _ = writeln!(stdout, "{:<28} {:<52} {}", r.name, r.what, r.shown);
    }
    let ratios = ratios(&rows);
    let mut all: Vec<(String, Json)> = rows
        .into_iter()
        .map(|r| (r.name.to_owned(), Json::Obj(r.fields)))
        .collect();
    all.push(("ratios".into(), ratios));
    all.push((
        "meta".into(),
        Json::Obj(vec![
            ("runs".into(), Json::Int(c.runs as u64)),
            ("quick".into(), Json::Int(u64::from(c.div > 1))),
            ("seconds".into(), Json::Num(started.elapsed().as_secs_f64())),
        ]),
    ));
    let mut text = String::new();
    Json::Obj(all).write(&mut text, 0);
    text.push('\n');
    let _ = writeln!(stdout, "(took {:.1} s)", started.elapsed().as_secs_f64());
    if let Some(path) = c.json {
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("core bench: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
        let _ = writeln!(stdout, "wrote {}", path.display());
    }
}

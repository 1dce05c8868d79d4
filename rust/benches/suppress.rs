//! The suppression set at 10M addresses (issue 14): memory per address and lookup time in
//! process.
//!
//!     cargo bench --bench suppress -- [--json PATH] [--quick]
//!
//! A request's address is in cache when it is checked (it just arrived), so addresses are
//! read in order; their slots are spread over the 128 MiB table by the hash, so each probe
//! is a memory read that misses the CPU's caches, as in a daemon with a large list.
//! Targets: at most 32 bytes an address; a check (hash and probe) at most 50 ns.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use _core::suppress::{Event, SuppressionSet};

/// Best of five runs of `f` over `0..n`, in ns per call.
fn best_ns(n: usize, f: &mut dyn FnMut(usize) -> bool) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let mut hits = 0usize;
        for i in 0..n {
            hits += usize::from(f(i));
        }
        black_box(hits);
        best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

fn main() {
    let mut json: Option<PathBuf> = None;
    let mut n: usize = 10_000_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => {
                json = args.next().map(|p| {
                    let p = PathBuf::from(p);
                    match std::env::var_os("PWD") {
                        Some(pwd) if p.is_relative() => PathBuf::from(pwd).join(p),
                        _ => p,
                    }
                });
            }
            "--quick" => n = 1_000_000,
            _ => {}
        }
    }
    let addresses: Vec<String> = (0..n)
        .map(|i| format!("user{i}@example{}.com", i % 1000))
        .collect();
    let mut set = SuppressionSet::new((0x1234, 0x5678));
    let t = Instant::now();
    for a in &addresses {
        let fp = set.fingerprint(b"", a.as_bytes());
        set.insert(fp, Event::Unsubscribe, None).unwrap();
    }
    let build_s = t.elapsed().as_secs_f64();
    let bytes_per_address = set.bytes() as f64 / n as f64;
    let lookups = n.min(2_000_000);
    let absent: Vec<String> = (0..lookups)
        .map(|i| format!("other{i}@example.net"))
        .collect();
    let present_ns = best_ns(lookups, &mut |i| {
        set.check(b"", addresses[i].as_bytes(), 0).is_some()
    });
    let absent_ns = best_ns(lookups, &mut |i| {
        set.check(b"", absent[i].as_bytes(), 0).is_some()
    });
    let hash_ns = best_ns(lookups, &mut |i| {
        set.fingerprint(b"", addresses[i].as_bytes()) != 0
    });
    let fps: Vec<u64> = addresses[..lookups]
        .iter()
        .map(|a| set.fingerprint(b"", a.as_bytes()))
        .collect();
    let probe_ns = best_ns(lookups, &mut |i| set.lookup(fps[i], 0).is_some());
    let batch: Vec<&[u8]> = addresses[..lookups].iter().map(String::as_bytes).collect();
    let mut found = Vec::with_capacity(lookups);
    let mut batch_ns = f64::MAX;
    for _ in 0..5 {
        found.clear();
        let t = Instant::now();
        set.check_batch(b"", &batch, 0, &mut found);
        batch_ns = batch_ns.min(t.elapsed().as_nanos() as f64 / lookups as f64);
    }
    assert!(found.iter().all(Option::is_some));
    let mut out = String::new();
    let target = |name: &str, measured: f64, bound: f64, unit: &str| {
        format!(
            "{{\"name\": \"{name}\", \"measured\": {measured:.2}, \"bound\": {bound}, \"unit\": \"{unit}\", \"at_most\": true}}"
        )
    };
    let targets = [
        target(
            &format!("suppression set bytes per address at {n}"),
            bytes_per_address,
            32.0,
            "B",
        ),
        target(
            "suppression check in process (hash + probe), one at a time",
            present_ns,
            50.0,
            "ns",
        ),
        target(
            "suppression check in process, in batches (hash all, then probe)",
            batch_ns,
            50.0,
            "ns",
        ),
    ];
    let _ = write!(
        out,
        "{{\n  \"addresses\": {n},\n  \"build_s\": {build_s:.3},\n  \"bytes_per_address\": {bytes_per_address:.2},\n  \
         \"check_listed_ns\": {present_ns:.1},\n  \"check_unlisted_ns\": {absent_ns:.1},\n  \"hash_only_ns\": {hash_ns:.1},\n  \
         \"probe_only_ns\": {probe_ns:.1},\n  \"check_batch_ns\": {batch_ns:.1},\n  \"targets\": [\n    {}\n  ]\n}}\n",
        targets.join(",\n    ")
    );
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes());
    if let Some(path) = json {
        std::fs::write(path, out).expect("write the JSON");
    }
}

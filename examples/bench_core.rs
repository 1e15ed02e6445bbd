//! Core microbenchmarks (`make bench-core`, or `cargo run --release --example bench_core`): what keygate's
//! host-independent core costs per request, natively, with 1k, 100k and 1M keys, and what a
//! 1M-key set costs to parse and hold.
//!
//! No benchmark framework: the thread's CPU time around many iterations, `black_box` so the
//! optimizer cannot drop the work, and a counting global allocator for allocations and bytes.
//! Numbers are printed as a markdown table; nothing here asserts a time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use keygate::core::config::Config;
use keygate::core::decision::{decide, Decision};
use keygate::core::digest::sha256;
use keygate::core::keyset::KeySet;
use keygate::core::request::RequestView;
use keygate::core::upstream::upstream_edits;

/// Counts allocations and live bytes, so the table can show allocations per request and the
/// memory a key set holds.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        let live = LIVE_BYTES.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK_BYTES.fetch_max(live, Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        if new_size >= layout.size() {
            let live =
                LIVE_BYTES.fetch_add(new_size - layout.size(), Relaxed) + new_size - layout.size();
            PEAK_BYTES.fetch_max(live, Relaxed);
        } else {
            LIVE_BYTES.fetch_sub(layout.size() - new_size, Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The plaintext of bench key `i` (the same keys as `bench/bench_config.py`'s, shorter form).
fn bench_key(i: usize) -> String {
    format!(
        "kgb_{}",
        &hex::encode(sha256(format!("keygate-bench-{i}").as_bytes()))[..32]
    )
}

/// A key-set document of `n` records: an id, a tenant and the digest of the key.
fn key_set_json(n: usize) -> String {
    let mut out = String::with_capacity(n * 130 + 16);
    out.push_str("{\"keys\":[");
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        let digest = hex::encode(sha256(bench_key(i).as_bytes()));
        out.push_str(&format!(
            "{{\"id\":\"bench-{i:07}\",\"tenant\":\"tenant-{}\",\"secret_sha256\":\"{digest}\"}}",
            i % 50
        ));
    }
    out.push_str("]}");
    out
}

/// The filter config the Envoy benchmark uses (`envoy/bench.yaml`), without inline keys.
const CONFIG: &str = r#"{"name": "bench", "credentials": [{"in": "header", "name": "x-api-key", "prefixes": ["kgb_"]}]}"#;

/// Requests per row of the table.
const REQUESTS: usize = 65_536;
/// 2^64 over the golden ratio: `i * SPREAD % n` puts consecutive requests far apart in the
/// document, so they share no cache line of the records or of the index by document order.
const SPREAD: usize = 0x9e37_79b9_7f4a_7c15u64 as usize;

/// A request as the adapter sees it from Envoy: wrk's headers plus Envoy's own.
fn request(key: &str) -> RequestView {
    let headers = [
        (":authority", "127.0.0.1:10004"),
        (":path", "/v1/items?page=2"),
        (":method", "GET"),
        (":scheme", "http"),
        ("x-api-key", key),
        ("user-agent", "keygate-bench/1"),
        ("accept", "application/json"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "6d1f2c8e-4b0a-4e59-9a57-3f1d2b9c0a11"),
    ];
    RequestView {
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        now: 1_800_000_000,
        ..Default::default()
    }
}

struct Measured {
    ns_per_op: f64,
    allocs_per_op: f64,
}

/// Nanoseconds this thread has run on a CPU (`/proc/thread-self/schedstat`), so that time the
/// scheduler gave to other processes on a shared machine is not counted; the wall clock where
/// that file is missing.
struct CpuClock {
    wall: Instant,
    on_cpu_ns: Option<u64>,
}

fn thread_cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

impl CpuClock {
    fn start() -> CpuClock {
        CpuClock {
            wall: Instant::now(),
            on_cpu_ns: thread_cpu_ns(),
        }
    }

    fn elapsed_ns(&self) -> f64 {
        match (self.on_cpu_ns, thread_cpu_ns()) {
            (Some(start), Some(now)) => now.saturating_sub(start) as f64,
            _ => self.wall.elapsed().as_nanos() as f64,
        }
    }
}

/// Runs `op` over the requests until about `budget_ms` passed; best of three passes, each
/// timed in CPU time (`CpuClock`).
fn measure(
    requests: &[RequestView],
    budget_ms: u128,
    mut op: impl FnMut(&RequestView),
) -> Measured {
    let mut best = f64::MAX;
    let mut allocs = 0.0;
    for _ in 0..3 {
        let start = Instant::now();
        let clock = CpuClock::start();
        let allocs_before = ALLOCATIONS.load(Relaxed);
        let mut ops = 0usize;
        while start.elapsed().as_millis() < budget_ms {
            for req in requests {
                op(black_box(req));
            }
            ops += requests.len();
        }
        let ns = clock.elapsed_ns() / ops as f64;
        if ns < best {
            best = ns;
            allocs = (ALLOCATIONS.load(Relaxed) - allocs_before) as f64 / ops as f64;
        }
    }
    Measured {
        ns_per_op: best,
        allocs_per_op: allocs,
    }
}

fn rss_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn run() -> Result<(), String> {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget_ms = if quick { 100 } else { 600 };
    let (config, _) = Config::parse(CONFIG.as_bytes()).map_err(|e| e.to_string())?;

    println!("### core, per request (native, `cargo run --release --example bench_core`)\n");
    println!("Each row cycles through the same number of requests, 65,536, whose keys are spread over the set (at 1k keys each key comes 65 times).\n");
    println!("| keys | valid key: decide | valid key: decide + upstream edits | allocations / valid request | unknown key: decide | allocations / unknown request |");
    println!("|---|---|---|---|---|---|");
    let sizes: &[usize] = if quick {
        &[1_000, 100_000]
    } else {
        &[1_000, 100_000, 1_000_000]
    };
    for &n in sizes {
        let keys = KeySet::from_json(key_set_json(n).as_bytes()).map_err(|e| e.to_string())?;
        // 65,536 requests at every size, so the requests themselves cost the same in every
        // row (at 1k keys each key comes 65 times): what differs between rows is the key
        // set. Their keys are spread over the set in no order of the document (i times an
        // odd constant, modulo the size): with 1M keys their records and index slots are far
        // larger than the CPU caches, as with uniformly random traffic.
        let picks = 0..REQUESTS;
        let valid: Vec<RequestView> = picks
            .clone()
            .map(|i| request(&bench_key(i.wrapping_mul(SPREAD) % n)))
            .collect();
        let unknown: Vec<RequestView> = picks.map(|i| request(&format!("kgb_{i:032x}"))).collect();
        for req in valid.iter().take(8) {
            if !matches!(decide(&config, &keys, req), Decision::Allow { .. }) {
                return Err(format!("a bench key was refused with {n} keys"));
            }
        }
        let decide_valid = measure(&valid, budget_ms, |r| {
            black_box(decide(&config, &keys, r));
        });
        let with_edits = measure(&valid, budget_ms, |r| {
            if let Decision::Allow { principal, .. } = decide(&config, &keys, r) {
                black_box(upstream_edits(&config, r, &principal));
            }
        });
        let decide_unknown = measure(&unknown, budget_ms, |r| {
            black_box(decide(&config, &keys, r));
        });
        println!(
            "| {n} | {:.0} ns | {:.0} ns | {:.1} | {:.0} ns | {:.1} |",
            decide_valid.ns_per_op,
            with_edits.ns_per_op,
            with_edits.allocs_per_op,
            decide_unknown.ns_per_op,
            decide_unknown.allocs_per_op
        );
    }

    let n = if quick { 100_000 } else { 1_000_000 };
    let json = key_set_json(n);
    let live_before = LIVE_BYTES.load(Relaxed);
    PEAK_BYTES.store(live_before, Relaxed);
    let rss_before = rss_kib("VmRSS:").unwrap_or(0);
    let clock = CpuClock::start();
    let keys = KeySet::from_json(json.as_bytes()).map_err(|e| e.to_string())?;
    let parse_ns = clock.elapsed_ns();
    let held = LIVE_BYTES.load(Relaxed) - live_before;
    let peak = PEAK_BYTES.load(Relaxed) - live_before;
    let rss_after = rss_kib("VmRSS:").unwrap_or(0);
    println!("\n### key-set parse, {n} keys (`KeySet::from_json`, native)\n");
    println!("| document | parse time | per key | held after parse | held per key | peak during parse | RSS growth |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {:.1} MB | {:.0} ms | {:.2} µs | {:.1} MB | {} B | {:.1} MB | {:.1} MB |",
        json.len() as f64 / 1e6,
        parse_ns / 1e6,
        parse_ns / 1e3 / n as f64,
        held as f64 / 1e6,
        held / n,
        peak as f64 / 1e6,
        rss_after.saturating_sub(rss_before) as f64 / 1024.0
    );
    black_box(keys);
    Ok(())
}

fn main() {
    if let Err(err) = run() {
        eprintln!("bench failed: {err}");
        std::process::exit(1);
    }
}

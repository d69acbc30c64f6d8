//! `sd21-bench serve`: throughput and latency of `sd21 serve` under 1, 4, 8… concurrent
//! clients, each sending its requests one after another. With `--url` it measures that running
//! server; otherwise it starts one server per `--max-batch` value and round (the values
//! alternate, the first rotating each round), so batching on and off are measured side by side
//! in one invocation on the same model and work.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::ops::median;

/// What to measure.
pub struct ServeOpts {
    pub url: Option<String>,
    pub model: String,
    pub sd21: Option<PathBuf>,
    pub max_batch: Vec<usize>,
    pub clients: Vec<usize>,
    pub requests: usize,
    pub repeats: usize,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
}

/// One (server, clients) measurement.
struct Load {
    images_per_s: f64,
    p50_s: f64,
    p95_s: f64,
}

/// Runs the measurements, prints the table and returns it as JSON.
pub fn serve(opts: &ServeOpts) -> Result<Value> {
    if opts.clients.is_empty() || opts.requests == 0 || opts.repeats == 0 {
        bail!("--clients, --requests and --repeats must not be empty or zero");
    }
    let configs: Vec<Option<usize>> = match &opts.url {
        Some(_) => vec![None],
        None => opts.max_batch.iter().copied().map(Some).collect(),
    };
    // loads[config][clients][round]
    let mut loads: Vec<Vec<Vec<Load>>> = configs
        .iter()
        .map(|_| opts.clients.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..opts.repeats {
        for k in 0..configs.len() {
            let c = (k + round) % configs.len();
            let server = match (&opts.url, configs[c]) {
                (Some(url), _) => Target::Running(parse_url(url)?),
                (None, max_batch) => Target::Started(Server::start(opts, max_batch.unwrap_or(1))?),
            };
            let addr = server.addr();
            // One request first: the server's lazy work (allocator, caches) is not measured.
            run_load(addr, opts, 1, 1)?;
            for (n, &clients) in opts.clients.iter().enumerate() {
                let load = run_load(addr, opts, clients, opts.requests)?;
                eprintln!(
                    "round {} max_batch {} clients {clients}: {:.3} images/s, p50 {:.2} s, p95 {:.2} s",
                    round + 1,
                    label(configs[c]),
                    load.images_per_s,
                    load.p50_s,
                    load.p95_s
                );
                loads[c][n].push(load);
            }
        }
    }
    let report = report(opts, &configs, &loads);
    print_table(&report);
    Ok(report)
}

fn label(max_batch: Option<usize>) -> String {
    max_batch.map_or("(server's)".into(), |m| m.to_string())
}

/// `clients` threads each sending `requests` generations one after another.
fn run_load(addr: SocketAddr, opts: &ServeOpts, clients: usize, requests: usize) -> Result<Load> {
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|client| {
            let (width, height, steps) = (opts.width, opts.height, opts.steps);
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(3600))
                    .build();
                (0..requests)
                    .map(|i| {
                        let body = json!({
                            "prompt": format!("load test, client {client}, request {i}"),
                            "width": width, "height": height, "steps": steps,
                            "seed": client * 1000 + i,
                        });
                        let sent = Instant::now();
                        let reply = agent
                            .post(&format!("http://{addr}/generate/"))
                            .set("Accept", "application/json")
                            .send_json(body);
                        match reply {
                            Ok(_) => Ok(sent.elapsed().as_secs_f64()),
                            Err(ureq::Error::Status(code, response)) => bail!(
                                "the server answered {code}: {}",
                                response.into_string().unwrap_or_default()
                            ),
                            Err(e) => Err(e).context("sending a generation"),
                        }
                    })
                    .collect()
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for thread in threads {
        let done = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        latencies.extend(done);
    }
    let wall = started.elapsed().as_secs_f64();
    Ok(Load {
        images_per_s: latencies.len() as f64 / wall,
        p50_s: percentile(&mut latencies.clone(), 0.50),
        p95_s: percentile(&mut latencies, 0.95),
    })
}

/// The nearest-rank percentile `q` of `samples`.
fn percentile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    if samples.is_empty() {
        return f64::NAN;
    }
    let rank = (q * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// Median and min–max of each figure over the rounds.
fn report(opts: &ServeOpts, configs: &[Option<usize>], loads: &[Vec<Vec<Load>>]) -> Value {
    let spread = |values: Vec<f64>| {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        json!({"median": median(values), "min": min, "max": max})
    };
    let rows: Vec<Value> = configs
        .iter()
        .zip(loads)
        .flat_map(|(config, by_clients)| {
            opts.clients
                .iter()
                .zip(by_clients)
                .map(move |(clients, rounds)| {
                    json!({
                        "max_batch": label(*config),
                        "clients": clients,
                        "images_per_s": spread(rounds.iter().map(|l| l.images_per_s).collect()),
                        "p50_s": spread(rounds.iter().map(|l| l.p50_s).collect()),
                        "p95_s": spread(rounds.iter().map(|l| l.p95_s).collect()),
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect();
    json!({
        "machine": machine(),
        "model": opts.url.clone().unwrap_or_else(|| opts.model.clone()),
        "width": opts.width, "height": opts.height, "steps": opts.steps,
        "requests_per_client": opts.requests,
        "rounds": opts.repeats,
        "rows": rows,
    })
}

fn print_table(report: &Value) {
    println!(
        "{} — model {}, {}×{}, {} steps, {} requests per client, {} rounds (median, min–max)",
        report["machine"].as_str().unwrap_or("?"),
        report["model"].as_str().unwrap_or("?"),
        report["width"],
        report["height"],
        report["steps"],
        report["requests_per_client"],
        report["rounds"]
    );
    println!(
        "{:>10} {:>7} {:>26} {:>24} {:>24}",
        "max_batch", "clients", "images/s", "p50 latency s", "p95 latency s"
    );
    let cell = |v: &Value| {
        format!(
            "{:.3} ({:.3}–{:.3})",
            v["median"].as_f64().unwrap_or(f64::NAN),
            v["min"].as_f64().unwrap_or(f64::NAN),
            v["max"].as_f64().unwrap_or(f64::NAN)
        )
    };
    for row in report["rows"].as_array().into_iter().flatten() {
        println!(
            "{:>10} {:>7} {:>26} {:>24} {:>24}",
            row["max_batch"].as_str().unwrap_or("?"),
            row["clients"].as_u64().unwrap_or(0),
            cell(&row["images_per_s"]),
            cell(&row["p50_s"]),
            cell(&row["p95_s"])
        );
    }
}

/// The CPU's model name and how many this process may use.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {threads} threads")
}

fn parse_url(url: &str) -> Result<SocketAddr> {
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    host.parse()
        .with_context(|| format!("--url wants http://IP:PORT, got {url}"))
}

/// The server a round measures.
enum Target {
    Running(SocketAddr),
    Started(Server),
}

impl Target {
    fn addr(&self) -> SocketAddr {
        match self {
            Target::Running(addr) => *addr,
            Target::Started(server) => server.addr,
        }
    }
}

/// A `sd21 serve` this bench started on a free loopback port; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(opts: &ServeOpts, max_batch: usize) -> Result<Server> {
        let binary = match &opts.sd21 {
            Some(path) => path.clone(),
            None => std::env::current_exe()?.with_file_name("sd21"),
        };
        let mut child = Command::new(&binary)
            .args([
                "serve",
                "--model",
                &opts.model,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .args(["--max-batch", &max_batch.to_string(), "--queue-size", "256"])
            .args(["--request-timeout", "86400"])
            .env("NO_COLOR", "1")
            .env_remove("SD21_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().context("the server's stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = sd21::server::listening_address(&line) {
                    let _ = tx.send(addr);
                }
            }
        });
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        server.addr = rx
            .recv_timeout(Duration::from_secs(600))
            .context("the server never said where it listens")?;
        server.wait_ready()?;
        Ok(server)
    }

    /// Polls `/ready` (bounded: 30 minutes, a full-size model loads and warms up in minutes).
    fn wait_ready(&mut self) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(1800);
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait()? {
                bail!("the server exited during start-up ({status})");
            }
            if ureq::get(&format!("http://{}/ready", self.addr))
                .call()
                .is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the server was not ready after 30 minutes")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

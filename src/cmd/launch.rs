//! Multi-process runs: where this process sits (`--nodes/--node-rank/--master`, or the
//! launcher variables `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` that
//! torchrun and Slurm scripts set), and `pali launch --nproc N -- train CFG.toml`, which starts N
//! processes on this host.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pali_trainer::dist::Topology;

use crate::backend::Devices;

/// Where this process sits in a multi-process run; flags override the launcher's variables.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DistArgs {
    /// Processes in the run [env: WORLD_SIZE; default 1].
    #[arg(long)]
    pub nodes: Option<usize>,
    /// This process's index, 0 .. nodes [env: RANK].
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// HOST:PORT of the orchestrator, which process 0 starts [env: MASTER_ADDR, MASTER_PORT].
    #[arg(long)]
    pub master: Option<String>,
    /// The orchestrator at --master is already running (`pali orchestrator`): process 0 does
    /// not start one.
    #[arg(long)]
    pub external_master: bool,
    /// Seconds a rank waits for the others at a collective operation before it stops with an
    /// error (a rank that died, hangs or cannot connect).
    #[arg(long, default_value_t = 900)]
    pub collective_timeout: u64,
}

fn env(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("{name}={v}: expected a number")),
        _ => Ok(None),
    }
}

impl DistArgs {
    /// This process's place, and its devices: with `LOCAL_RANK` set and several devices
    /// listed, the one at that index (one GPU per process, as torchrun starts them).
    pub fn topology(&self, devices: Devices) -> Result<(Topology, Devices)> {
        let nodes = match self.nodes {
            Some(n) => n,
            None => env("WORLD_SIZE")?.unwrap_or(1),
        };
        let node_rank = match self.node_rank {
            Some(r) => r,
            None => env("RANK")?.unwrap_or(0),
        };
        if nodes == 0 || node_rank >= nodes {
            bail!("process rank {node_rank} is not below the number of processes {nodes}");
        }
        let master = match &self.master {
            Some(m) => Some(m.clone()),
            None => match (std::env::var("MASTER_ADDR"), std::env::var("MASTER_PORT")) {
                (Ok(a), Ok(p)) => Some(format!("{a}:{p}")),
                (Ok(a), Err(_)) => Some(format!("{a}:29500")),
                _ => None,
            },
        };
        let mut devices = devices;
        // One device per process only when the launcher started several processes per host
        // (torchrun and `pali launch` set LOCAL_WORLD_SIZE).
        let per_host = env("LOCAL_WORLD_SIZE")?.unwrap_or(1);
        if nodes > 1 && devices.0.len() > 1 && per_host > 1 {
            if per_host != devices.0.len() {
                bail!(
                    "LOCAL_WORLD_SIZE={per_host} processes on this host but {} devices listed:                      list one device per process",
                    devices.0.len()
                );
            }
            if let Some(l) = env("LOCAL_RANK")? {
                let Some(d) = devices.0.get(l).copied() else {
                    bail!(
                        "LOCAL_RANK={l} but only {} devices are listed",
                        devices.0.len()
                    );
                };
                devices = Devices(vec![d]);
            }
        }
        let topo = Topology {
            nodes,
            node_rank,
            master,
            external: self.external_master,
            timeout: Duration::from_secs(self.collective_timeout.max(1)),
        };
        Ok((topo, devices))
    }
}

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// Processes to start on this host.
    #[arg(long)]
    pub nproc: usize,
    /// The orchestrator's port (process 0 listens there; process r serves tensors on
    /// port + 1 + r).
    #[arg(long, default_value_t = 29500)]
    pub port: u16,
    /// The pali command each process runs, e.g. `-- train run.toml`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Starts `nproc` copies of this program with the launcher variables set; waits for all. When
/// one fails, the others are stopped, and the first failure is the error.
pub fn launch(a: LaunchArgs) -> Result<()> {
    if a.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    let exe = std::env::current_exe().context("finding the pali executable")?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for r in 0..a.nproc {
        let mut c = Command::new(&exe);
        c.args(&a.command)
            .env("WORLD_SIZE", a.nproc.to_string())
            .env("RANK", r.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", a.port.to_string());
        let child = c.spawn().with_context(|| format!("starting process {r}"))?;
        children.push((r, child));
    }
    let mut failed: Option<String> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            let (r, ch) = &mut children[i];
            match ch.try_wait()? {
                Some(st) => {
                    if !st.success() && failed.is_none() {
                        failed = Some(format!("process {r} exited with {st}"));
                    }
                    children.swap_remove(i);
                }
                None => i += 1,
            }
        }
        if failed.is_some() {
            // Give the others a moment to stop on their own (they see the lost peer), then end them.
            std::thread::sleep(Duration::from_secs(2));
            for (_, ch) in children.iter_mut() {
                let _ = ch.kill();
                let _ = ch.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match failed {
        Some(f) => bail!("{f}"),
        None => Ok(()),
    }
}

//! Where this process sits in a launch: its rank, the world's size, its rank on its node, and
//! where rank 0 listens. Read from the variables `torchrun` sets (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), or SLURM's (`SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_LOCALID`) with `MASTER_ADDR` exported by the job script.

use crate::Error;

/// The port rank 0 listens on when `MASTER_PORT` is not set (PyTorch's default).
pub const DEFAULT_PORT: u16 = 29500;

/// This process's place in a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// How many ranks there are.
    pub world: usize,
    /// Its rank on its node: the GPU it uses.
    pub local_rank: usize,
    /// Where rank 0 listens.
    pub master_addr: String,
    /// Rank 0's port.
    pub master_port: u16,
}

impl Placement {
    /// The placement the variables describe, or `None` when they describe no launch (neither
    /// `WORLD_SIZE` nor `SLURM_NTASKS` is set). `var` looks a variable up (the CLI passes the
    /// environment; tests pass a table).
    ///
    /// ```
    /// use did_engine::launch::Placement;
    /// let vars = [("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "10.0.0.1")];
    /// let p = Placement::from_vars(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    ///     .unwrap()
    ///     .unwrap();
    /// assert_eq!((p.rank, p.world, p.local_rank, p.master_port), (1, 2, 1, 29500));
    /// assert_eq!(Placement::from_vars(|_| None).unwrap(), None);
    /// ```
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Placement>, Error> {
        let bad = |m: String| Error::Launch(m);
        let number = |name: &str| -> Result<Option<usize>, Error> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    bad(format!("{name}={v:?} is not a number; set it as the launcher would (a rank or a count)"))
                }),
            }
        };
        let (rank, world, local, source) = if var("WORLD_SIZE").is_some() {
            (
                number("RANK")?,
                number("WORLD_SIZE")?,
                number("LOCAL_RANK")?,
                "RANK",
            )
        } else if var("SLURM_NTASKS").is_some() {
            (
                number("SLURM_PROCID")?,
                number("SLURM_NTASKS")?,
                number("SLURM_LOCALID")?,
                "SLURM_PROCID",
            )
        } else {
            return Ok(None);
        };
        let world = world.unwrap_or(1);
        let rank = rank.ok_or_else(|| bad(format!("the world size is set but {source} is not; launch with torchrun, srun, or `did train --gpus N`")))?;
        if world == 0 || rank >= world {
            return Err(bad(format!(
                "rank {rank} of a world of {world}: a rank must be below the world size; check the launcher's variables"
            )));
        }
        let master_addr = match var("MASTER_ADDR") {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            _ if world == 1 => "127.0.0.1".to_string(),
            _ => return Err(bad("MASTER_ADDR is not set: export the address of rank 0's node (under SLURM: MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1))".into())),
        };
        let master_port = match var("MASTER_PORT") {
            None => DEFAULT_PORT,
            Some(p) => p
                .trim()
                .parse()
                .map_err(|_| bad(format!("MASTER_PORT={p:?} is not a port number (1-65535)")))?,
        };
        Ok(Some(Placement {
            rank,
            world,
            local_rank: local.unwrap_or(0),
            master_addr,
            master_port,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Option<Placement>, Error> {
        Placement::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn slurm_variables_place_a_rank_too() {
        let p = from(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "node07"),
            ("MASTER_PORT", "12345"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            p,
            Placement {
                rank: 5,
                world: 8,
                local_rank: 1,
                master_addr: "node07".into(),
                master_port: 12345
            }
        );
    }

    #[test]
    fn bad_variables_name_the_variable_and_the_fix() {
        let err = |vars: &[(&str, &str)]| from(vars).unwrap_err().to_string();
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a")])
                .contains("below the world size")
        );
        assert!(err(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("WORLD_SIZE=\"two\""));
        assert!(err(&[("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")]).contains("RANK is not"));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "0")]).contains("export the address"));
        assert!(err(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "70000")
        ])
        .contains("MASTER_PORT=\"70000\""));
    }
}

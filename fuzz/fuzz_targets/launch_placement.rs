//! The launcher's variables (`RANK`, `WORLD_SIZE`, `MASTER_PORT`, SLURM's …) as `did train` reads
//! them: a placement with rank < world, no launch, or an error naming the variable. The input is
//! `NAME=VALUE` lines.
#![no_main]
use did_engine::launch::Placement;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let vars: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let look = |name: &str| vars.iter().rev().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
    if let Ok(Some(p)) = Placement::from_vars(look) {
        assert!(p.rank < p.world && !p.master_addr.is_empty());
    }
});

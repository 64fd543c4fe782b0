//! Each daemon's YAML configuration: any text either loads into a valid
//! config or yields field errors; it never panics. The first byte picks
//! the daemon.

#![no_main]

use bulwark_common::config::{Overrides, from_str_with};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let overrides = Overrides::new();
    match which % 3 {
        0 => drop(from_str_with::<bulwark_lb::config::LbConfig>(Some(&text), None, &overrides)),
        1 => drop(from_str_with::<bulwark_backup::BackupConfig>(Some(&text), None, &overrides)),
        _ => drop(from_str_with::<bulwark_prober::ProberConfig>(Some(&text), None, &overrides)),
    }
});

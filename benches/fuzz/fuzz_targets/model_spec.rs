//! The TOML model-spec reader on arbitrary text, then the layer plan and summary of what it
//! accepts, under every Bayesian-layer policy and posterior.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whvi::zoo::{self, BayesPolicy, BuildOptions, Method, ModelSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = ModelSpec::from_toml(text, "fuzz input") else {
        return;
    };
    let policies = [
        BayesPolicy::Head,
        BayesPolicy::All,
        BayesPolicy::Last,
        BayesPolicy::None,
    ];
    let methods = [
        Method::Whvi,
        Method::MeanField,
        Method::McDropout,
        Method::Deterministic,
    ];
    for policy in policies {
        for method in methods {
            let options = BuildOptions {
                policy,
                method,
                ..BuildOptions::default()
            };
            if zoo::plan(&spec, &options).is_ok() {
                zoo::summary(&spec, &options).expect("a spec that plans has a summary");
            }
        }
    }
});

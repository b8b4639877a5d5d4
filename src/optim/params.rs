//! The named, sorted variables an optimiser updates, and the rules that exclude some of them from
//! weight decay.

use candle_core::Var;
use serde::{Deserialize, Serialize};

/// A rule matching variable names, used by the optimisers' `no_decay` lists.
///
/// A variable is excluded from weight decay when any rule of the list matches its full name
/// (e.g. `block1.conv.bias`). Serialised as `{"suffix": ".bias"}` and so on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NameMatch {
    /// The name equals the string.
    Exact(String),
    /// The name starts with the string.
    Prefix(String),
    /// The name ends with the string.
    Suffix(String),
    /// The name contains the string.
    Contains(String),
}

impl NameMatch {
    /// Whether the rule matches `name`.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NameMatch::Exact(s) => name == s,
            NameMatch::Prefix(s) => name.starts_with(s.as_str()),
            NameMatch::Suffix(s) => name.ends_with(s.as_str()),
            NameMatch::Contains(s) => name.contains(s.as_str()),
        }
    }
}

/// A learning-rate multiplier for the variables whose names match `rule` (a parameter group
/// with its own learning rate, in PyTorch's terms). Serialised as
/// `{"rule": {"suffix": ".s1"}, "factor": 10.0}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrScale {
    /// Which variables.
    pub rule: NameMatch,
    /// Their learning rate is the optimiser's times this.
    pub factor: f64,
}

/// Checks that every factor is a finite number > 0.
pub(crate) fn validate_lr_scales(optimizer: &str, scales: &[LrScale]) -> crate::Result<()> {
    for scale in scales {
        if !(scale.factor.is_finite() && scale.factor > 0.0) {
            return Err(crate::Error::invalid(format!(
                "{optimizer}: the learning-rate factor of {:?} must be a finite number > 0, got {}",
                scale.rule, scale.factor
            )));
        }
    }
    Ok(())
}

/// The variables of an optimiser: sorted by name, float dtypes only, each with its weight decay
/// and learning-rate factor.
#[derive(Debug)]
pub(crate) struct Params {
    pub(crate) names: Vec<String>,
    pub(crate) vars: Vec<Var>,
    /// Whether each variable is subject to weight decay (not excluded by a `no_decay` rule).
    pub(crate) decayed: Vec<bool>,
    /// Each variable's learning-rate factor: that of the first matching [`LrScale`], else 1.
    pub(crate) lr_factor: Vec<f64>,
}

impl Params {
    /// Sorts `vars` by name, drops non-float ones and applies the `no_decay` and `lr_scale`
    /// rules.
    pub(crate) fn new(
        mut vars: Vec<(String, Var)>,
        no_decay: &[NameMatch],
        lr_scale: &[LrScale],
    ) -> crate::Result<Self> {
        vars.retain(|(_, v)| v.dtype().is_float());
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = vars.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(crate::Error::invalid(format!(
                "two optimiser variables are both named `{}`: names must be unique",
                w[0].0
            )));
        }
        let decayed = vars
            .iter()
            .map(|(name, _)| !no_decay.iter().any(|rule| rule.matches(name)))
            .collect();
        let lr_factor = vars
            .iter()
            .map(|(name, _)| {
                lr_scale
                    .iter()
                    .find(|scale| scale.rule.matches(name))
                    .map_or(1.0, |scale| scale.factor)
            })
            .collect();
        let (names, vars) = vars.into_iter().unzip();
        Ok(Params {
            names,
            vars,
            decayed,
            lr_factor,
        })
    }

    /// Names unnamed variables by position (zero-padded so that sorting keeps their order).
    pub(crate) fn positional(
        vars: Vec<Var>,
        no_decay: &[NameMatch],
        lr_scale: &[LrScale],
    ) -> crate::Result<Self> {
        let width = vars.len().max(1).to_string().len();
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("{i:0width$}"), v))
            .collect();
        Self::new(named, no_decay, lr_scale)
    }

    pub(crate) fn len(&self) -> usize {
        self.vars.len()
    }

    /// The index of the variable called `name`.
    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.names.binary_search_by(|n| n.as_str().cmp(name)).ok()
    }

    /// The weight decay of variable `i` given the configured `weight_decay`.
    pub(crate) fn decay(&self, i: usize, weight_decay: f64) -> f64 {
        if self.decayed[i] {
            weight_decay
        } else {
            0.0
        }
    }
}

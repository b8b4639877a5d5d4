//! Reading optimiser state back by name, with checks that say exactly what does not fit.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::params::Params;
use crate::{Error, Result};

/// A step count as a state tensor: a scalar `i64` on the CPU (saturating at `i64::MAX`).
pub(crate) fn count_tensor(count: u64) -> Tensor {
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    Tensor::new(count, &Device::Cpu).expect("a scalar tensor on the CPU can always be built")
}

/// The state entries handed to `load_state`, taken out one by one as the optimiser asks for
/// them; whatever is left at the end does not belong.
pub(crate) struct StateReader<'a> {
    entries: HashMap<String, Tensor>,
    params: &'a Params,
    /// The optimiser, for messages ("SGD").
    optimiser: &'static str,
    /// The buffer prefixes this optimiser uses ("momentum").
    prefixes: &'static [&'static str],
}

impl<'a> StateReader<'a> {
    /// Collects `state`, failing on a repeated entry.
    pub(crate) fn new<I>(
        state: I,
        params: &'a Params,
        optimiser: &'static str,
        prefixes: &'static [&'static str],
    ) -> Result<Self>
    where
        I: IntoIterator<Item = (String, Tensor)>,
    {
        let mut entries = HashMap::new();
        for (key, tensor) in state {
            if entries.contains_key(&key) {
                return Err(Error::invalid(format!(
                    "{optimiser} optimiser state: entry `{key}` appears twice"
                )));
            }
            entries.insert(key, tensor);
        }
        Ok(StateReader {
            entries,
            params,
            optimiser,
            prefixes,
        })
    }

    /// Takes the step-count entry `key`, which must be present: a non-negative integer scalar.
    pub(crate) fn required_count(&mut self, key: &str) -> Result<u64> {
        match self.count(key)? {
            Some(count) => Ok(count),
            None => Err(Error::invalid(format!(
                "{} optimiser state has no `{key}` entry (the step count): it is not a complete \
                 optimiser state",
                self.optimiser
            ))),
        }
    }

    /// Takes the step-count entry `key` if present.
    pub(crate) fn count(&mut self, key: &str) -> Result<Option<u64>> {
        let Some(tensor) = self.entries.remove(key) else {
            return Ok(None);
        };
        if tensor.rank() != 0 || !tensor.dtype().is_int() {
            return Err(Error::invalid(format!(
                "{} optimiser state entry `{key}` must be an integer scalar (a step count), \
                 found a {:?} tensor of shape {:?}",
                self.optimiser,
                tensor.dtype(),
                tensor.dims()
            )));
        }
        let count = tensor.to_dtype(DType::I64)?.to_scalar::<i64>()?;
        u64::try_from(count).map(Some).map_err(|_| {
            Error::invalid(format!(
                "{} optimiser state entry `{key}` is a negative step count ({count})",
                self.optimiser
            ))
        })
    }

    /// Takes the buffer `<prefix>.<name of variable i>` if present, checked against the
    /// variable's shape and dtype and moved to its device.
    pub(crate) fn buffer(&mut self, prefix: &str, i: usize) -> Result<Option<Tensor>> {
        let name = &self.params.names[i];
        let var = &self.params.vars[i];
        let key = format!("{prefix}.{name}");
        let Some(tensor) = self.entries.remove(&key) else {
            return Ok(None);
        };
        if tensor.dims() != var.dims() {
            return Err(Error::invalid(format!(
                "{} optimiser state entry `{key}` has shape {:?} but variable `{name}` has shape \
                 {:?}",
                self.optimiser,
                tensor.dims(),
                var.dims()
            )));
        }
        if tensor.dtype() != var.dtype() {
            return Err(Error::invalid(format!(
                "{} optimiser state entry `{key}` has dtype {:?} but variable `{name}` has dtype \
                 {:?}",
                self.optimiser,
                tensor.dtype(),
                var.dtype()
            )));
        }
        Ok(Some(tensor.to_device(var.device())?))
    }

    /// The name of variable `i`, for messages.
    pub(crate) fn name(&self, i: usize) -> &str {
        &self.params.names[i]
    }

    /// Fails if any entry was not taken, naming it and saying why it does not belong.
    pub(crate) fn finish(self) -> Result<()> {
        let Some(key) = self.entries.keys().min() else {
            return Ok(());
        };
        let optimiser = self.optimiser;
        if let Some((prefix, name)) = key.split_once('.') {
            if self.prefixes.contains(&prefix) && self.params.index_of(name).is_none() {
                return Err(Error::invalid(format!(
                    "{optimiser} optimiser state entry `{key}` is for variable `{name}`, which \
                     this optimiser does not hold: the state comes from a different model"
                )));
            }
        }
        let expected: Vec<String> = self
            .prefixes
            .iter()
            .map(|p| format!("`{p}.<variable name>`"))
            .collect();
        Err(Error::invalid(format!(
            "unexpected {optimiser} optimiser state entry `{key}`: this optimiser's state holds \
             `{}` and {} (is it another optimiser's state?)",
            super::STEP_KEY,
            expected.join(", ")
        )))
    }
}

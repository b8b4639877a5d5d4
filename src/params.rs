//! Trainable parameters with seeded initialisation.
//!
//! Candle's [`VarMap`] initialises variables with the device's random generator, which cannot be
//! seeded on the CPU. [`Params`] keeps the same model (a `VarMap` behind a [`VarBuilder`], so
//! layers are built exactly as in candle-nn) but draws every initial value from a
//! [`WhviRng`]: the same seed gives the same network, bit for bit.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{init::NormalOrUniform, var_builder::SimpleBackend, Init, VarBuilder, VarMap};
use rand::Rng;
use rand_distr::StandardNormal;

use crate::rng::{seeded, WhviRng};

/// A [`VarMap`] whose new variables are initialised from a seeded generator.
#[derive(Clone)]
pub struct Params {
    var_map: VarMap,
    rng: Arc<Mutex<WhviRng>>,
    /// Loaded parameters: asking for a variable that does not exist is an error, not a new
    /// initialisation (a checkpoint that lacks a tensor must not be silently re-initialised).
    strict: bool,
    /// Names that layers have asked for, to find tensors a loaded file has but nobody uses.
    requested: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl Params {
    /// An empty set of parameters whose initial values will be drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Params {
            var_map: VarMap::new(),
            rng: Arc::new(Mutex::new(seeded(seed))),
            strict: false,
            requested: Arc::default(),
        }
    }

    /// Parameters holding exactly `tensors` (e.g. read from a checkpoint), as trainable
    /// variables. A layer that asks for a name not among them gets an error naming it.
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> candle_core::Result<Self> {
        let params = Params {
            strict: true,
            ..Params::new(0)
        };
        {
            let mut data = params
                .var_map
                .data()
                .lock()
                .expect("parameter map lock poisoned");
            for (name, tensor) in tensors {
                data.insert(name, Var::from_tensor(&tensor.detach())?);
            }
        }
        Ok(params)
    }

    /// A [`VarBuilder`] that creates missing variables here, initialised from the seeded
    /// generator, and returns existing ones (after checking their shape).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The underlying candle [`VarMap`].
    pub fn var_map(&self) -> &VarMap {
        &self.var_map
    }

    /// Every variable with its name, sorted by name (a stable order for optimisers and files).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self
            .var_map
            .data()
            .lock()
            .expect("parameter map lock poisoned");
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Names of variables that no layer has asked for (sorted): for loaded parameters, tensors
    /// of the file that the network does not use.
    pub fn unrequested(&self) -> Vec<String> {
        let requested = self.requested.lock().expect("parameter name lock poisoned");
        let mut names: Vec<String> = self
            .named_vars()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !requested.contains(n))
            .collect();
        names.sort();
        names
    }

    fn initial_value(
        &self,
        shape: &Shape,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let mut rng = self.rng.lock().expect("parameter rng lock poisoned");
        let normal = |rng: &mut WhviRng, mean: f64, std: f64| -> Vec<f32> {
            (0..n)
                .map(|_| (mean + std * rng.sample::<f64, _>(StandardNormal)) as f32)
                .collect()
        };
        let uniform = |rng: &mut WhviRng, lo: f64, up: f64| -> Vec<f32> {
            (0..n)
                .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
                .collect()
        };
        let values = match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                }
            }
        };
        Tensor::from_vec(values, shape.clone(), device)?.to_dtype(dtype)
    }
}

impl SimpleBackend for Params {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.requested
            .lock()
            .expect("parameter name lock poisoned")
            .insert(name.to_string());
        if let Some(var) = self
            .var_map
            .data()
            .lock()
            .expect("parameter map lock poisoned")
            .get(name)
        {
            if var.shape() != &shape {
                candle_core::bail!(
                    "parameter {name} has shape {:?}, but the layer asks for {:?}",
                    var.shape(),
                    shape
                );
            }
            return if var.dtype() == dtype {
                Ok(var.as_tensor().clone())
            } else {
                var.as_tensor().to_dtype(dtype)
            };
        }
        if self.strict {
            candle_core::bail!("tensor {name} (shape {shape:?}) is missing");
        }
        let var = Var::from_tensor(&self.initial_value(&shape, init, dtype, device)?)?;
        let tensor = var.as_tensor().clone();
        self.var_map
            .data()
            .lock()
            .expect("parameter map lock poisoned")
            .insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self
            .var_map
            .data()
            .lock()
            .expect("parameter map lock poisoned");
        match data.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(device),
            None => candle_core::bail!("parameter {name} does not exist"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.var_map
            .data()
            .lock()
            .expect("parameter map lock poisoned")
            .contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_initial_values_and_names_are_sorted() {
        let build = |seed| {
            let params = Params::new(seed);
            let vb = params.var_builder(DType::F32, &Device::Cpu);
            vb.get_with_hints(
                (3, 4),
                "b.w",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )
            .unwrap();
            vb.get_with_hints(5, "a.bias", Init::Uniform { lo: -1.0, up: 1.0 })
                .unwrap();
            params
        };
        let values = |p: &Params| -> Vec<Vec<f32>> {
            p.named_vars()
                .iter()
                .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        let (a, b, c) = (build(1), build(1), build(2));
        let names: Vec<String> = a.named_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["a.bias".to_string(), "b.w".to_string()]);
        assert_eq!(values(&a), values(&b));
        assert_ne!(values(&a), values(&c));
    }

    #[test]
    fn existing_variable_is_reused_and_shape_checked() {
        let params = Params::new(0);
        let vb = params.var_builder(DType::F32, &Device::Cpu);
        let first = vb.get_with_hints(3, "w", Init::Const(2.0)).unwrap();
        let again = vb.get_with_hints(3, "w", Init::Const(5.0)).unwrap();
        assert_eq!(
            first.to_vec1::<f32>().unwrap(),
            again.to_vec1::<f32>().unwrap()
        );
        let err = vb.get_with_hints(4, "w", Init::Const(0.0)).unwrap_err();
        assert!(err.to_string().contains("parameter w has shape"), "{err}");
    }
}

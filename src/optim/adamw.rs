//! Adam with decoupled (AdamW) or coupled (Adam) weight decay.

use candle_core::backprop::GradStore;
use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var, WithDType};
use candle_nn::Optimizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::params::{validate_lr_scales, LrScale, NameMatch, Params};
use super::state::{count_tensor, StateReader};
use super::{to_candle, NamedOptimizer, STEP_KEY};
use crate::cpu::with_slices;
use crate::{Error, Result};

/// The prefix of the first-moment buffers in the state: `adam_m.<variable name>`.
const FIRST_MOMENT: &str = "adam_m";
/// The prefix of the second-moment buffers in the state: `adam_v.<variable name>`.
const SECOND_MOMENT: &str = "adam_v";
/// The prefix of the per-variable step counts in the state: `adam_step.<variable name>`.
const VAR_STEP: &str = "adam_step";

/// The settings of [`AdamW`]; the defaults are PyTorch's `AdamW` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// The learning rate (default 1e-3).
    pub lr: f64,
    /// The decay rate of the first-moment estimate (default 0.9).
    pub beta1: f64,
    /// The decay rate of the second-moment estimate (default 0.999).
    pub beta2: f64,
    /// Added to the denominator for numerical stability (default 1e-8).
    pub eps: f64,
    /// The weight decay (default 1e-2).
    pub weight_decay: f64,
    /// `true` (default): AdamW, the parameter shrinks by `lr · weight_decay · param` each step.
    /// `false`: Adam, `weight_decay · param` is added to the gradient (L2 penalty).
    pub decoupled_weight_decay: bool,
    /// Variables whose names match any of these rules are never decayed (default: none).
    pub no_decay: Vec<NameMatch>,
    /// Learning-rate factors for groups of variables (default: none, every factor 1).
    pub lr_scale: Vec<LrScale>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            decoupled_weight_decay: true,
            no_decay: Vec::new(),
            lr_scale: Vec::new(),
        }
    }
}

impl AdamWConfig {
    /// PyTorch's `Adam` defaults: as [`AdamWConfig::default`] with coupled weight decay 0.
    pub fn adam() -> Self {
        AdamWConfig {
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            ..AdamWConfig::default()
        }
    }

    /// Checks the settings: `lr`, `eps` and `weight_decay` finite and >= 0, betas in [0, 1).
    pub fn validate(&self) -> Result<()> {
        for (what, value) in [
            ("lr", self.lr),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(Error::invalid(format!(
                    "AdamW {what} must be a finite number >= 0, got {value}"
                )));
            }
        }
        for (what, value) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(Error::invalid(format!(
                    "AdamW {what} must be in [0, 1), got {value}"
                )));
            }
        }
        validate_lr_scales("AdamW", &self.lr_scale)
    }
}

/// The moment estimates of one variable.
#[derive(Debug, Clone)]
struct Moments {
    m: Tensor,
    v: Tensor,
    /// The number of steps in which the variable had a gradient.
    step: u64,
}

/// One variable's update: the settings with its learning rate, decay and step folded in.
#[derive(Debug, Clone, Copy)]
struct Update {
    lr: f64,
    decay: f64,
    decoupled: bool,
    beta1: f64,
    beta2: f64,
    eps: f64,
    bias_correction1: f64,
    bias_correction2: f64,
}

impl Update {
    /// The update as candle tensor ops (any device and dtype): `(param, m, v)` after the step.
    fn composed(
        &self,
        mut param: Tensor,
        mut grad: Tensor,
        prev: Option<&Moments>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        if self.decay != 0.0 {
            if self.decoupled {
                param = (param * (1.0 - self.lr * self.decay))?;
            } else {
                grad = (grad + (&param * self.decay)?)?;
            }
        }
        let (m, v) = match prev {
            None => (
                (&grad * (1.0 - self.beta1))?,
                (grad.sqr()? * (1.0 - self.beta2))?,
            ),
            Some(prev) => (
                ((&prev.m * self.beta1)? + (&grad * (1.0 - self.beta1))?)?,
                ((&prev.v * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?,
            ),
        };
        let step_size = self.lr / self.bias_correction1;
        let denom = v
            .sqrt()?
            .affine(1.0 / self.bias_correction2.sqrt(), self.eps)?;
        let param = (param - (m.div(&denom)? * step_size)?)?;
        Ok((param, m, v))
    }

    /// The same update in one sweep over the CPU data of f32 / f64 tensors (a dozen candle ops
    /// stream the parameter-sized tensors a dozen times), `param` updated in place: the new
    /// moments `(m, v)`, or `None` off that path (another device or type, a strided parameter,
    /// or a gradient or moment sharing its storage).
    fn fused(
        &self,
        param: &Tensor,
        grad: &Tensor,
        prev: Option<&Moments>,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        if !param.device().is_cpu() || !param.is_contiguous() {
            return Ok(None);
        }
        match param.dtype() {
            DType::F32 => self.fused_typed::<f32>(param, grad, prev),
            DType::F64 => self.fused_typed::<f64>(param, grad, prev),
            _ => Ok(None),
        }
    }

    fn fused_typed<T: SweepElem>(
        &self,
        param: &Tensor,
        grad: &Tensor,
        prev: Option<&Moments>,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let grad = grad.contiguous()?;
        let zeros;
        let (m, v) = match prev {
            Some(prev) => (prev.m.contiguous()?, prev.v.contiguous()?),
            None => {
                zeros = param.zeros_like()?;
                (zeros.clone(), zeros)
            }
        };
        // The sweep reads these under read locks while it writes the parameter under a write
        // lock: on one storage that would deadlock.
        let parameter_storage = storage_start::<T>(param)?;
        for other in [&grad, &m, &v] {
            if storage_start::<T>(other)? == parameter_storage {
                return Ok(None);
            }
        }
        let sweep = Sweep::new(self);
        let (m_new, v_new) = with_slices::<T, _>("adamw", &[&grad, &m, &v], |d| {
            let op = InPlace {
                sweep,
                inputs: [d[0], d[1], d[2]],
                moments: Mutex::new(None),
            };
            param.inplace_op1(&op)?;
            let moments = op.moments.into_inner().unwrap_or_else(|e| e.into_inner());
            moments.ok_or_else(|| candle_core::Error::Msg("adamw: the sweep did not run".into()))
        })??;
        let (shape, device) = (param.shape(), param.device());
        Ok(Some((
            Tensor::from_vec(m_new, shape, device)?,
            Tensor::from_vec(v_new, shape, device)?,
        )))
    }
}

/// Where the CPU storage behind `t` starts: equal for two tensors exactly when they share it.
fn storage_start<T: WithDType>(t: &Tensor) -> candle_core::Result<*const T> {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(T::cpu_storage_as_slice(cpu)?.as_ptr()),
        _ => candle_core::bail!("adamw: the fused update runs on the CPU only"),
    }
}

/// The constants of one variable's update, in its element type.
#[derive(Debug, Clone, Copy)]
struct Sweep<T> {
    shrink: T,
    coupled: T,
    beta1: T,
    beta2: T,
    one_minus_beta1: T,
    one_minus_beta2: T,
    step_size: T,
    eps: T,
    root_correction2: T,
}

impl<T: WithDType> Sweep<T> {
    fn new(rule: &Update) -> Self {
        let t = |x: f64| T::from_f64(x);
        Sweep {
            shrink: t(if rule.decoupled {
                1.0 - rule.lr * rule.decay
            } else {
                1.0
            }),
            coupled: t(if rule.decoupled { 0.0 } else { rule.decay }),
            beta1: t(rule.beta1),
            beta2: t(rule.beta2),
            one_minus_beta1: t(1.0 - rule.beta1),
            one_minus_beta2: t(1.0 - rule.beta2),
            step_size: t(rule.lr / rule.bias_correction1),
            eps: t(rule.eps),
            root_correction2: t(1.0 / rule.bias_correction2.sqrt()),
        }
    }

    /// Updates `p` from `[g, m, v]` in place and returns the new `(m, v)`.
    fn run(&self, p: &mut [T], [g, m, v]: [&[T]; 3]) -> (Vec<T>, Vec<T>) {
        let n = p.len();
        let (mut m_new, mut v_new) = (Vec::with_capacity(n), Vec::with_capacity(n));
        p.par_chunks_mut(CHUNK)
            .zip(m_new.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
            .zip(v_new.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(chunk, ((ps, ms), vs))| {
                let at = chunk * CHUNK;
                for j in 0..ps.len() {
                    let (p, g) = (ps[j], g[at + j]);
                    let g = g + self.coupled * p;
                    let m = self.beta1 * m[at + j] + self.one_minus_beta1 * g;
                    let v = self.beta2 * v[at + j] + self.one_minus_beta2 * g * g;
                    let denom = T::from_f64(v.to_f64().sqrt()) * self.root_correction2 + self.eps;
                    ps[j] = p * self.shrink - m / denom * self.step_size;
                    ms[j].write(m);
                    vs[j].write(v);
                }
            });
        // SAFETY: the chunks above cover elements 0..n of both moments, and each chunk wrote
        // every one of its elements.
        unsafe {
            m_new.set_len(n);
            v_new.set_len(n);
        }
        (m_new, v_new)
    }
}

/// The element types of the in-place sweep: their mutable CPU data.
trait SweepElem: WithDType {
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

impl SweepElem for f32 {
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [f32]> {
        match storage {
            CpuStorage::F32(data) => Some(data),
            _ => None,
        }
    }
}

impl SweepElem for f64 {
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [f64]> {
        match storage {
            CpuStorage::F64(data) => Some(data),
            _ => None,
        }
    }
}

/// The update as an in-place op on the parameter (candle's `Var::set` would copy a new
/// parameter into the variable: two more sweeps over it, and a zeroed buffer): it reads the
/// gradient and the moments `inputs` and leaves the new moments in `moments`.
struct InPlace<'a, T> {
    sweep: Sweep<T>,
    inputs: [&'a [T]; 3],
    moments: Mutex<Option<(Vec<T>, Vec<T>)>>,
}

impl<T: SweepElem> InplaceOp1 for InPlace<'_, T> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (Some(data), Some((start, end))) = (T::slice_mut(storage), layout.contiguous_offsets())
        else {
            candle_core::bail!("adamw: the parameter must be contiguous, of its update's type");
        };
        let p = &mut data[start..end];
        if self.inputs.iter().any(|s| s.len() != p.len()) {
            candle_core::bail!("adamw: gradient, moments and parameter differ in size");
        }
        let moments = self.sweep.run(p, self.inputs);
        *self.moments.lock().unwrap_or_else(|e| e.into_inner()) = Some(moments);
        Ok(())
    }
}

/// Elements per parallel task of the fused update.
const CHUNK: usize = 1 << 14;

/// Adam with decoupled weight decay, with exactly the update rule of PyTorch's
/// `torch.optim.AdamW` (or `torch.optim.Adam` with
/// [`AdamWConfig::decoupled_weight_decay`] off).
///
/// For each variable `p` with gradient `g` in the step's [`GradStore`] (variables without a
/// gradient are left alone; like PyTorch, each variable counts its own steps `t`):
///
/// ```text
/// lr ← lr · factor                      (the first `lr_scale` rule matching p, if any)
/// p ← p · (1 − lr · weight_decay)       (AdamW, if p is decayed)
/// g ← g + weight_decay · p              (Adam, if p is decayed)
/// t ← t + 1
/// m ← β1 · m + (1 − β1) · g             (m = v = 0 before the first step)
/// v ← β2 · v + (1 − β2) · g²
/// p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)
/// ```
///
/// Build it with [`NamedOptimizer::from_named`]. [`Optimizer::new`] takes unnamed variables and
/// names them by position (`"0"`, `"1"`, …, zero-padded), which the `no_decay` rules and the
/// state then see.
///
/// State: [`STEP_KEY`] and, for every variable that has had a gradient, `adam_m.<name>`,
/// `adam_v.<name>` and its own step count `adam_step.<name>` (a scalar `i64`).
#[derive(Debug)]
pub struct AdamW {
    params: Params,
    config: AdamWConfig,
    moments: Vec<Option<Moments>>,
    step: u64,
}

impl AdamW {
    /// The settings (with the learning rate last set).
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    fn with_params(params: Params, config: AdamWConfig) -> Self {
        let moments = vec![None; params.len()];
        AdamW {
            params,
            config,
            moments,
            step: 0,
        }
    }
}

impl Optimizer for AdamW {
    type Config = AdamWConfig;

    fn new(vars: Vec<Var>, config: AdamWConfig) -> candle_core::Result<Self> {
        config.validate().map_err(to_candle)?;
        let params =
            Params::positional(vars, &config.no_decay, &config.lr_scale).map_err(to_candle)?;
        Ok(Self::with_params(params, config))
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let c = &self.config;
        for i in 0..self.params.len() {
            let var = &self.params.vars[i];
            let Some(grad) = grads.get(var) else {
                continue;
            };
            let prev = self.moments[i].as_ref();
            let step = prev.map_or(1, |p| p.step + 1);
            let decay = self.params.decay(i, c.weight_decay);
            let rule = Update {
                lr: c.lr * self.params.lr_factor[i],
                decay,
                decoupled: c.decoupled_weight_decay,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                // f64 exponents: exact for every step count a run can reach.
                bias_correction1: 1.0 - c.beta1.powf(step as f64),
                bias_correction2: 1.0 - c.beta2.powf(step as f64),
            };
            // Gradients of variables keep candle's backprop graph (only inner nodes are
            // detached); a moment built from one would hold every activation of the step
            // alive, and the next step's moment this one: memory grows without bound.
            let grad = grad.detach();
            let param = var.as_detached_tensor();
            let (m, v) = match rule.fused(&param, &grad, prev)? {
                Some(moments) => moments,
                None => {
                    let (new_param, m, v) = rule.composed(param, grad, prev)?;
                    var.set(&new_param)?;
                    (m, v)
                }
            };
            self.moments[i] = Some(Moments { m, v, step });
        }
        self.step += 1;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }
}

impl NamedOptimizer for AdamW {
    fn from_named(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let params = Params::new(vars, &config.no_decay, &config.lr_scale)?;
        Ok(Self::with_params(params, config))
    }

    fn names(&self) -> &[String] {
        &self.params.names
    }

    fn vars(&self) -> &[Var] {
        &self.params.vars
    }

    fn step_count(&self) -> u64 {
        self.step
    }

    fn weight_decay_of(&self, name: &str) -> Option<f64> {
        let i = self.params.index_of(name)?;
        Some(self.params.decay(i, self.config.weight_decay))
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![(STEP_KEY.to_string(), count_tensor(self.step))];
        for (name, moments) in self.params.names.iter().zip(&self.moments) {
            if let Some(mo) = moments {
                state.push((format!("{FIRST_MOMENT}.{name}"), mo.m.clone()));
                state.push((format!("{SECOND_MOMENT}.{name}"), mo.v.clone()));
                state.push((format!("{VAR_STEP}.{name}"), count_tensor(mo.step)));
            }
        }
        state
    }

    fn load_state<I>(&mut self, state: I) -> Result<()>
    where
        I: IntoIterator<Item = (String, Tensor)>,
    {
        let mut reader = StateReader::new(
            state,
            &self.params,
            "AdamW",
            &[FIRST_MOMENT, SECOND_MOMENT, VAR_STEP],
        )?;
        let step = reader.required_count(STEP_KEY)?;
        let mut moments = Vec::with_capacity(self.params.len());
        for i in 0..self.params.len() {
            let m = reader.buffer(FIRST_MOMENT, i)?;
            let v = reader.buffer(SECOND_MOMENT, i)?;
            let var_step = reader.count(&format!("{VAR_STEP}.{}", reader.name(i)))?;
            moments.push(match (m, v, var_step) {
                (Some(m), Some(v), Some(step)) => Some(Moments { m, v, step }),
                (None, None, None) => None,
                (m, v, s) => {
                    let has = |present: bool, key: &str| {
                        format!(
                            "{} `{key}.{}`",
                            if present { "has" } else { "lacks" },
                            reader.name(i)
                        )
                    };
                    return Err(Error::invalid(format!(
                        "AdamW optimiser state for variable `{}` is incomplete: it {}, {} and {}",
                        reader.name(i),
                        has(m.is_some(), FIRST_MOMENT),
                        has(v.is_some(), SECOND_MOMENT),
                        has(s.is_some(), VAR_STEP),
                    )));
                }
            });
        }
        reader.finish()?;
        self.step = step;
        self.moments = moments;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(n: usize, seed: u64, dtype: DType) -> Tensor {
        let data: Vec<f64> = (0..n as u64)
            .map(|i| (((i + 1) * (seed + 7) * 2654435761) % 1000) as f64 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(data, n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn a_gradient_sharing_the_parameters_storage_takes_the_composed_update() {
        // Read and write locks on one storage in the fused sweep would deadlock.
        let rule = Update {
            lr: 1e-3,
            decay: 0.0,
            decoupled: true,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            bias_correction1: 0.1,
            bias_correction2: 0.001,
        };
        let param = random(100, 1, DType::F32);
        let before = param.to_vec1::<f32>().unwrap();
        let view = param.narrow(0, 0, 100).unwrap();
        assert!(rule.fused(&param, &view, None).unwrap().is_none());
        assert_eq!(param.to_vec1::<f32>().unwrap(), before);
        assert!(rule
            .fused(&param, &param.copy().unwrap(), None)
            .unwrap()
            .is_some());
        assert_ne!(param.to_vec1::<f32>().unwrap(), before);
    }

    #[test]
    fn the_fused_cpu_update_equals_the_composed_one() {
        // More elements than one parallel chunk, so that chunk offsets are exercised.
        let n = CHUNK + 1234;
        for dtype in [DType::F32, DType::F64] {
            for (decay, decoupled) in [(0.0, true), (0.05, true), (0.05, false)] {
                let rule = Update {
                    lr: 3e-3,
                    decay,
                    decoupled,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    bias_correction1: 1.0 - 0.9f64.powi(3),
                    bias_correction2: 1.0 - 0.999f64.powi(3),
                };
                let (param, grad) = (random(n, 1, dtype), random(n, 2, dtype));
                let prev = Moments {
                    m: random(n, 3, dtype),
                    v: random(n, 4, dtype).abs().unwrap(),
                    step: 2,
                };
                for prev in [None, Some(&prev)] {
                    let updated = param.copy().unwrap();
                    let (m, v) = rule.fused(&updated, &grad, prev).unwrap().unwrap();
                    let composed = rule.composed(param.clone(), grad.clone(), prev).unwrap();
                    for (a, b) in [(updated, composed.0), (m, composed.1), (v, composed.2)] {
                        let diff = (a - b)
                            .unwrap()
                            .abs()
                            .unwrap()
                            .max(0)
                            .unwrap()
                            .to_dtype(DType::F64)
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap();
                        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
                        assert!(
                            diff < tol,
                            "{dtype:?} decay {decay} decoupled {decoupled}: {diff}"
                        );
                    }
                }
            }
        }
    }
}

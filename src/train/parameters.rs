//! A network's variables by name, each with the role its layer declares.
//!
//! The optimiser needs names (its state is saved by name) and roles (weight decay, the
//! diagonals' learning-rate factor, what it does not update); the layers declare the roles
//! ([`crate::layers::BayesianModule::parameters`]), so nothing here guesses from a name.

use std::collections::HashMap;

use candle_core::{TensorId, Var};

use crate::layers::{ParamRole, Parameter};
use crate::params::Params;
use crate::{Error, Result};

/// One variable of a network, by its full name, with its role.
#[derive(Debug, Clone)]
pub struct NamedParameter {
    /// The full name, e.g. `conv3.s1` (the name in checkpoints and optimiser state).
    pub name: String,
    /// The variable.
    pub var: Var,
    /// What its layer declares it is for.
    pub role: ParamRole,
}

/// Every variable of `params`, sorted by name, with the role that `declared` (a network's
/// [`parameters`](crate::layers::BayesianModule::parameters)) gives its tensor.
///
/// Tensors are matched by identity, not by name. A variable that no layer declares, or a
/// declared tensor that is not a variable of `params`, is an error: the model and its
/// parameters do not belong together. Build the network in the dtype of the variables (f32 for
/// training): a VarBuilder of another dtype hands layers converted copies, not the variables.
pub fn named_parameters(params: &Params, declared: &[Parameter]) -> Result<Vec<NamedParameter>> {
    let mut roles: HashMap<TensorId, ParamRole> =
        declared.iter().map(|p| (p.tensor.id(), p.role)).collect();
    let mut named = Vec::with_capacity(declared.len());
    for (name, var) in params.named_vars() {
        let Some(role) = roles.remove(&var.as_tensor().id()) else {
            return Err(Error::invalid(format!(
                "parameter `{name}` belongs to no layer of the network: were the parameters \
                 built for another model?"
            )));
        };
        named.push(NamedParameter { name, var, role });
    }
    if !roles.is_empty() {
        return Err(Error::invalid(format!(
            "{} tensors of the network are not variables of its parameters: build the network \
             from the parameters' own var_builder",
            roles.len()
        )));
    }
    Ok(named)
}

/// The variables an optimiser updates: all but the running statistics.
pub fn trainable(parameters: &[NamedParameter]) -> Vec<(String, Var)> {
    parameters
        .iter()
        .filter(|p| p.role.is_trained())
        .map(|p| (p.name.clone(), p.var.clone()))
        .collect()
}

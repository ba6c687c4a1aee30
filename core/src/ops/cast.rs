//! dtype conversion.

use crate::dtype::DType;
use crate::tensor::Tensor;
use crate::{Error, Result};

pub(crate) fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    Err(Error::DType {
        op: "to_dtype",
        expected: dtype,
        got: t.dtype(),
    })
}

"""Pure metric functions (arrays in, numbers out), one module per family of metrics."""

"""Tasks built on the public API and `_tl`, the one way into TransformerLens (private: import from
`transformer_lens_patching.ioi`)."""

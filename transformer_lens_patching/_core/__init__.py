"""The patching pipeline's parts, independent of any one method (private: import from the top level).

Nodes and IterNodes (`nodes`) name what to patch, in terms of the component table
(`components`); `sites` resolves them against a model and an input; a method turns the
sites into a `plan` of stacked passes, sized by `memory`; the `executor` runs each pass
with a `program` of hook steps, taking patch values from `sources`, reading only the
logits a metric selects (`selection`) and measuring it (`measure`).
"""

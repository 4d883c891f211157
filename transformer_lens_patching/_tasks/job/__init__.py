"""The circuit-analysis job on any task: its steps, their records and the report (`tl-patch analyze`,
`tl-patch ioi`)."""

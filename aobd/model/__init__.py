"""The pure core: workflow documents, expressions, events, patches, materialization, IR and run state.

Nothing in this package performs I/O, reads a clock or draws random numbers; callers inject what they need.
"""

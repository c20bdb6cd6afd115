"""Post-processing of sweeps: results -> Parquet, Pareto fronts, statistics, figures, report.

    sources     read a sweep invocation from MLflow or from Ray Tune's result folder
    tables      results.parquet / epochs.parquet: explicit schemas, resolved config in metadata
    fronts      Pareto fronts (pure functions over arrays and over the results table)
    statistics  Spearman's rho with a bootstrap interval; monotonicity in signed alpha
    figures     the paper's figures as matplotlib Figures (Agg, no pyplot), PNG + SVG
    report      one self-contained HTML report
    pareto      the post-processor and its CLI: python -m dashboards.pareto NAME
"""

"""Reports: figures from results (no training), and pages that gather them."""

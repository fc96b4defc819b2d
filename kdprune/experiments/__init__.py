"""The experiment tools (sweep, report, frontier, study, compare, runcache) and what they share: run records
(runs), statistics (stats), the DVC queue (queue) and argument parsers (args)."""

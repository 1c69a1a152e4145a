"""The command-line programs: thin; the code behind them lives in pipeline/ and model/."""

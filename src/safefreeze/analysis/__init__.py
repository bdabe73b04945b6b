"""What is done with finished runs: reports, plots, loss landscapes and the bench runner."""

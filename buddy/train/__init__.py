"""Training: the router (Decision Module); the budget predictor comes later."""

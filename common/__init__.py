"""What every part shares: the error hierarchy, byte formatting, logging set-up."""

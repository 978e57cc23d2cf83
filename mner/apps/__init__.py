"""Applications that span stages (above extract and train): predict."""

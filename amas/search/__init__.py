"""The mask search: the adversarial alignment objective, the proximal mask update and the user-facing MaskSearch."""

"""The ground floor: file, weight and hub reading that every other package uses; it imports none of them."""

"""Twenty response formats for the structured-output acceptance test and benchmark: nested objects, arrays, enums,
bounded numbers, required and optional fields. Strings and arrays are bounded so that a valid answer always fits
the test's max_tokens (as a real application bounds what it asks for)."""

from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

Short = Field(min_length=1, max_length=16)


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Planet(BaseModel):
    name: str = Short
    moons: int = Field(ge=0, le=200)


class Person(BaseModel):
    name: str = Short
    age: int = Field(ge=0, le=120)
    email: str | None = Field(default=None, max_length=24)


class Address(BaseModel):
    street: str = Short
    city: str = Short
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Customer(BaseModel):
    person: Person
    address: Address


class Book(BaseModel):
    title: str = Short
    year: int = Field(ge=1450, le=2030)
    genres: list[Literal["fiction", "history", "science", "poetry"]] = Field(min_length=1, max_length=3)


class Temperature(BaseModel):
    city: str = Short
    celsius: float = Field(ge=-90, le=60)


class Flags(BaseModel):
    enabled: bool
    beta: bool
    colour: Colour


class Point(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Polygon(BaseModel):
    name: str = Short
    points: list[Point] = Field(min_length=3, max_length=4)


class Ingredient(BaseModel):
    item: str = Short
    grams: int = Field(ge=1, le=1000)


class Recipe(BaseModel):
    dish: str = Short
    ingredients: list[Ingredient] = Field(min_length=1, max_length=3)
    vegetarian: bool


class Order(BaseModel):
    order_id: int = Field(ge=1, le=99999)
    status: Literal["pending", "shipped", "delivered"]
    express: bool | None = None


class Rating(BaseModel):
    product: str = Short
    stars: int = Field(ge=1, le=5)
    comment: str | None = Field(default=None, max_length=30)


class Team(BaseModel):
    team: str = Short
    # bounded names: an unbounded string let a 0.8-temperature sample run to max_tokens (finish_reason length)
    members: list[Annotated[str, StringConstraints(min_length=1, max_length=16)]] = Field(min_length=1, max_length=3)


class Event(BaseModel):
    title: str = Short
    day: Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    hour: int = Field(ge=0, le=23)


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    score: float = Field(ge=0, le=1)


class Node(BaseModel):
    label: str = Short
    children: list[Planet] = Field(max_length=2)


class Inventory(BaseModel):
    warehouse: str = Short
    counts: list[int] = Field(min_length=1, max_length=4)


class Contact(BaseModel):
    kind: Literal["phone", "email"]
    value: str = Field(min_length=3, max_length=20)


class Profile(BaseModel):
    username: str = Field(pattern=r"^[a-z]{3,10}$")
    contacts: list[Contact] = Field(min_length=1, max_length=2)
    verified: bool


class Measurement(BaseModel):
    sensor: Literal["a", "b", "c"]
    values: list[float] = Field(min_length=1, max_length=3)
    unit: Literal["m", "cm"] = "m"


class Trip(BaseModel):
    origin: Address
    destination: Address
    nights: int = Field(ge=1, le=30)


SCHEMAS: list[tuple[type[BaseModel], str]] = [
    (Planet, "Name a planet of the solar system and its number of moons."),
    (Person, "Describe a fictional person."),
    (Address, "Give a postal address."),
    (Customer, "Describe a customer with their address."),
    (Book, "Describe a famous book."),
    (Temperature, "Give today's temperature in a city."),
    (Flags, "Give feature flags."),
    (Polygon, "Describe a triangle by its corner points."),
    (Recipe, "Give a simple recipe."),
    (Order, "Describe an online order."),
    (Rating, "Rate a product."),
    (Team, "Describe a small team."),
    (Event, "Describe a meeting."),
    (Sentiment, "Classify the sentiment of: I love this!"),
    (Node, "Describe a star with its planets."),
    (Inventory, "Give the stock counts of a warehouse."),
    (Profile, "Describe a user profile."),
    (Measurement, "Give sensor measurements."),
    (Trip, "Describe a trip between two addresses."),
    (Contact, "Give a contact detail."),
]
